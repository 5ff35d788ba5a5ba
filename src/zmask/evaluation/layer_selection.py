"""Automatic choice of the layer sets S and D from training data.

The paper leaves "which layers?" as future work and picks them by hand. Here each candidate
layer (the outputs of a model's modules down to a resolution bound) is scored on training images
only: how well its own SPR heatmap separates clean from patched images (ROC AUC of the heatmap
peak), how much brighter the heatmap is inside the patch than outside (localisation), and what
it costs to refine per image. S takes the layers that localise best among those that separate;
D the layers that separate best. The evidence goes into the profile and the report.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ..config import ZMaskConfig
from ..core.calibration import roc_auc
from ..core.capture import ActivationCapture
from ..core.refinement import LayerRefiner
from ..core.statistics import resize_nearest
from ..data.batching import dataset_length, image_batches
from ..defense import ZMask
from ..errors import ConfigError


@dataclass(frozen=True)
class LayerEvidence:
    """One candidate layer: its output shape (C x h x w), separability (AUC), localisation
    (mean heatmap inside / outside the patch) and refinement cost (ms per image, this machine)."""

    layer: str
    shape: tuple[int, int, int]
    auc: float
    localisation: float
    cost_ms: float


@dataclass
class LayerSelection:
    """The chosen S and D, the rule that chose them and the evidence for every candidate."""

    shallow: tuple[str, ...]
    deep: tuple[str, ...]
    evidence: list[LayerEvidence] = field(default_factory=list)
    rule: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"shallow": list(self.shallow), "deep": list(self.deep), "rule": self.rule, "evidence": [asdict(e) for e in self.evidence]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LayerSelection:
        evidence = [LayerEvidence(e["layer"], tuple(e["shape"]), e["auc"], e["localisation"], e["cost_ms"]) for e in data["evidence"]]
        return cls(tuple(data["shallow"]), tuple(data["deep"]), evidence, data.get("rule", ""))

    def table(self) -> str:
        """The evidence as a Markdown table (chosen sets marked)."""
        lines = ["| layer | C x h x w | AUC | inside/outside | cost (ms) | in |", "|---|---|---|---|---|---|"]
        for e in sorted(self.evidence, key=lambda e: -e.auc):
            sets = "".join(name for name, chosen in (("S", self.shallow), ("D", self.deep)) if e.layer in chosen) or "-"
            lines.append(f"| {e.layer} | {'x'.join(map(str, e.shape))} | {e.auc:.3f} | {e.localisation:.2f} | {e.cost_ms:.1f} | {sets} |")
        return "\n".join(lines)


def candidate_layers(model: nn.Module, image: torch.Tensor, max_stride: int = 8, max_candidates: int = 64) -> list[str]:
    """Modules whose output is a B x C x h x w map at most ``max_stride`` times coarser than
    ``image`` (1 x 3 x H x W), in execution order; a module that returns its child's very
    tensor counts once (the outer name); a module that runs more than once per forward pass (one
    activation shared by several branches) is left out, as Z-Mask reads each layer once; at most
    ``max_candidates``, spread evenly over depth."""
    if max_stride < 1 or max_candidates < 1:
        raise ConfigError(f"max_stride={max_stride} and max_candidates={max_candidates} must be at least 1")
    seen: dict[str, tuple[int, tuple[int, ...]]] = {}
    order: list[str] = []
    alive: list[torch.Tensor] = []  # held until the end, so that no two outputs can share an address by reuse

    calls: dict[str, int] = {}

    def hook(name: str):
        def record(module, inputs, output):
            calls[name] = calls.get(name, 0) + 1
            if isinstance(output, torch.Tensor) and output.dim() == 4 and name not in seen:
                seen[name] = (output.data_ptr(), tuple(output.shape))
                order.append(name)
                alive.append(output)
        return record

    handles = [module.register_forward_hook(hook(name)) for name, module in model.named_modules() if name]
    try:
        with torch.no_grad():
            model(image)
    finally:
        for handle in handles:
            handle.remove()
    height, width = image.shape[-2:]
    fine = [n for n in order if calls[n] == 1 and seen[n][1][-2] * max_stride >= height and seen[n][1][-1] * max_stride >= width]
    # A container and its last child share the output tensor: keep the outer (shorter) name.
    by_tensor: dict[tuple, str] = {}
    for name in fine:
        key = seen[name]
        if key not in by_tensor or len(name) < len(by_tensor[key]):
            by_tensor[key] = name
    unique = [n for n in fine if by_tensor[seen[n]] == n]
    if len(unique) <= max_candidates:
        return unique
    step = len(unique) / max_candidates
    return [unique[int(i * step)] for i in range(max_candidates)]


def layer_evidence(
    model: nn.Module, layers: Sequence[str], config: ZMaskConfig, statistics_images: Dataset, clean: Dataset,
    patched: list[tuple[torch.Tensor, torch.Tensor]], batch_size: int = 8, layers_at_once: int = 16, progress: bool = True,
) -> list[LayerEvidence]:
    """Per candidate layer, from training images only: clean statistics on ``statistics_images``,
    then the SPR heatmap (the shallow kernels) of held-out ``clean`` images and of ``patched``
    (images, masks) batches; the clean images should not be statistics images (their Z-scores
    would look cleaner than any new image's). ``layers_at_once`` bounds the activations held."""

    layers = list(dict.fromkeys(layers))
    if not layers:
        raise ConfigError("no candidate layers to compare")
    if layers_at_once < 1:
        raise ConfigError(f"layers_at_once={layers_at_once} must be at least 1")
    statistics_loader, clean_loader = image_batches(statistics_images, batch_size), image_batches(clean, batch_size)
    sources = [(images, None) for images in clean_loader] + list(patched)
    peaks: dict[str, dict[str, list[float]]] = {layer: {"clean": [], "patched": []} for layer in layers}
    contrast: dict[str, list[float]] = {layer: [] for layer in layers}
    seconds: dict[str, float] = {layer: 0.0 for layer in layers}
    shapes: dict[str, tuple[int, int, int]] = {}
    images_seen = sum(images.shape[0] for images, _ in sources)
    groups = [layers[start:start + layers_at_once] for start in range(0, len(layers), layers_at_once)]
    for group in tqdm(groups, desc="layer groups", disable=not progress or len(groups) == 1):
        defense = ZMask(model, config.replace(shallow_layers=tuple(group), deep_layers=tuple(group[:1]), extreme_layers=()))
        defense.fit_statistics(statistics_loader, progress=progress and len(groups) == 1)
        statistics = defense.state.statistics
        assert statistics is not None  # fit_statistics has just set them
        refiner = LayerRefiner(defense.config)
        for images, masks in tqdm(sources, desc="layers", disable=not progress or len(groups) > 1):
            with torch.no_grad(), ActivationCapture(model, group) as capture:
                model(images)
                has_patch = [False] * images.shape[0] if masks is None else masks.flatten(1).amax(1).gt(0).tolist()
                for layer in group:
                    activation = capture.activations[layer]
                    shapes[layer] = (int(activation.shape[1]), int(activation.shape[2]), int(activation.shape[3]))
                    started = time.perf_counter()
                    heatmap = refiner.heatmaps(activation, statistics[layer], {"S": config.shallow_kernels})["S"]
                    seconds[layer] += time.perf_counter() - started
                    for peak, positive in zip(heatmap.flatten(1).amax(1).tolist(), has_patch):
                        peaks[layer]["patched" if positive else "clean"].append(peak)
                    if masks is not None:
                        inside = resize_nearest(masks, (int(heatmap.shape[-2]), int(heatmap.shape[-1]))) > 0.5
                        mean_in = (heatmap * inside).flatten(1).sum(1) / inside.flatten(1).sum(1).clamp(min=1)
                        mean_out = (heatmap * ~inside).flatten(1).sum(1) / (~inside).flatten(1).sum(1).clamp(min=1)
                        ratios = (mean_in / mean_out.clamp(min=1e-9)).tolist()
                        contrast[layer] += [r for r, has in zip(ratios, inside.flatten(1).any(1).tolist()) if has]
    evidence = []
    for layer in layers:
        clean_peaks, patched_peaks = peaks[layer]["clean"], peaks[layer]["patched"]
        auc = roc_auc(clean_peaks, patched_peaks)
        ratio = float(sum(contrast[layer]) / len(contrast[layer])) if contrast[layer] else float("nan")
        evidence.append(LayerEvidence(layer, shapes[layer], auc, ratio, 1e3 * seconds[layer] / max(images_seen, 1)))
    return evidence


def choose_layers(evidence: Sequence[LayerEvidence], shallow_count: int = 3, deep_count: int = 3, min_auc: float = 0.8) -> LayerSelection:
    """S: the ``shallow_count`` layers with the highest localisation among those whose AUC is at
    least ``min_auc`` (the best-separating ones if too few pass); D: the ``deep_count`` layers
    with the highest AUC. Ties go to the better localisation, then to the cheaper layer."""
    if shallow_count < 1 or deep_count < 1:
        raise ConfigError(f"shallow_count={shallow_count} and deep_count={deep_count} must be at least 1")
    usable = [e for e in evidence if e.auc == e.auc and e.localisation == e.localisation]
    if not usable:
        raise ConfigError("no candidate layer has usable evidence (AUC and localisation); give clean and patched training images")
    by_auc = sorted(usable, key=lambda e: (-e.auc, -e.localisation, e.cost_ms))
    separating = [e for e in usable if e.auc >= min_auc]
    if len(separating) < shallow_count:
        separating = by_auc[: max(shallow_count, len(separating))]
    shallow = sorted(separating, key=lambda e: (-e.localisation, -e.auc, e.cost_ms))[:shallow_count]
    deep = by_auc[:deep_count]
    rule = (f"S: the {shallow_count} best-localising layers with AUC >= {min_auc}; D: the {deep_count} best-separating layers "
            "(ties: localisation, then cost); evidence on training images only")
    return LayerSelection(tuple(e.layer for e in shallow), tuple(e.layer for e in deep), list(evidence), rule)


def select_layers(
    model: nn.Module, config: ZMaskConfig, statistics_images: Dataset, clean: Dataset, patched: list[tuple[torch.Tensor, torch.Tensor]],
    candidates: Sequence[str] | None = None, shallow_count: int = 3, deep_count: int = 3, min_auc: float = 0.8,
    max_stride: int = 8, max_candidates: int = 64, batch_size: int = 8, progress: bool = True,
) -> LayerSelection:
    """Rank ``candidates`` (default: :func:`candidate_layers` on the first statistics image) on training
    data (:func:`layer_evidence`: statistics on ``statistics_images``, held-out ``clean`` images
    against ``patched`` batches) and choose S and D (:func:`choose_layers`)."""
    if dataset_length(statistics_images) == 0 or dataset_length(clean) == 0 or not patched:
        raise ConfigError("layer selection needs statistics images, held-out clean images and patched (images, masks) batches "
                          "from the training split")
    if candidates is None:
        candidates = candidate_layers(model, statistics_images[0]["image"][None], max_stride, max_candidates)
    evidence = layer_evidence(model, candidates, config, statistics_images, clean, patched, batch_size, progress=progress)
    return choose_layers(evidence, shallow_count, deep_count, min_auc)
