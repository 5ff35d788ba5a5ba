"""Evaluation loops: task metrics, detection scores and mask IoU for patch settings x defenses.

Loops are shardable: each ``torch.distributed`` rank evaluates its own share of the dataset
(``zmask.distributed.shard``) and metrics are reduced across ranks. Patch positions depend only on
the seed and each image's index, so every defense sees the same attacked images on any sharding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..attacks import EOTConfig, PhysicalConditions, apply_patch
from ..contracts import Defense, Task
from ..core.masking import mask_iou
from ..data.batching import dataset_length
from ..distributed import all_gather_objects, shard


@dataclass
class PatchSetting:
    """A named attack condition: no patch (``patch=None``) or a patch placed at random positions,
    optionally seen through ``physical`` conditions (print, light, view, blur, JPEG)."""

    name: str
    patch: torch.Tensor | None = None
    physical: PhysicalConditions | None = None


@dataclass
class DefenseMetrics:
    """What one defense achieved under one setting.

    ``indices``: the dataset index of each evaluated image, sorted; ``scores``, ``flagged`` and
    ``mask_iou`` (when recorded) hold one entry per image in that order, on any sharding.
    ``metric``: the task's metric accumulator (kept for the bootstrap, :mod:`.uncertainty`).
    """

    task: dict[str, Any] = field(default_factory=dict)
    scores: list[float] = field(default_factory=list)
    flagged: list[bool] = field(default_factory=list)
    mask_iou: list[float] = field(default_factory=list)
    indices: list[int] = field(default_factory=list)
    metric: Any = field(default=None, repr=False)

    def summary(self) -> dict[str, Any]:
        result = dict(self.task)
        if self.flagged:
            result["flag_rate"] = sum(self.flagged) / len(self.flagged)
        if self.mask_iou:
            result["mask_iou"] = sum(self.mask_iou) / len(self.mask_iou)
        return result

    def gather(self) -> None:
        """Concatenate every rank's images and put all per-image lists in dataset-index order."""
        columns = [(name, values) for name, values in (("scores", self.scores), ("flagged", self.flagged), ("mask_iou", self.mask_iou))
                   if len(values) == len(self.indices)]
        rows = all_gather_objects(list(zip(self.indices, *(values for _, values in columns))))
        rows.sort(key=lambda row: row[0])
        self.indices = [row[0] for row in rows]
        for position, (name, _) in enumerate(columns, start=1):
            setattr(self, name, [row[position] for row in rows])


class _Indexed(Dataset):
    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return dataset_length(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {**self.dataset[index], "index": index}


def place_patches(images: torch.Tensor, patch: torch.Tensor, indices: Sequence[int], seed: int,
                  physical: PhysicalConditions | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Paste the (8-bit, unscaled) patch at a random position per image, seeded by (seed, index);
    with ``physical`` its appearance and footprint are drawn from those conditions first."""
    patched, masks = [], []
    for image, index in zip(images, indices):
        generator = torch.Generator().manual_seed(seed * 1_000_003 + int(index))
        placed = apply_patch(image[None], patch, generator, EOTConfig.none(), transform=physical)
        patched.append(placed.images[0])
        masks.append(placed.masks[0])
    return torch.stack(patched), torch.stack(masks)


def evaluate(
    task: Task,
    dataset: Dataset,
    settings: Sequence[PatchSetting],
    defenses: Sequence[Defense],
    seed: int = 0,
    batch_size: int = 4,
    progress: bool = True,
    keep_examples: int = 0,
) -> tuple[dict[str, dict[str, DefenseMetrics]], list[dict[str, Any]]]:
    """Run every defense under every setting; returns metrics[setting][defense] and example images.

    Rows are the defenses' names and the names of the detectors that observed their forward pass
    (``DefenseResult.extra``).
    """
    indexed = shard(_Indexed(dataset))
    results: dict[str, dict[str, DefenseMetrics]] = {}
    examples: list[dict[str, Any]] = []
    for setting in settings:
        metrics = {defense.name: DefenseMetrics() for defense in defenses}
        accumulators = {defense.name: task.metric() for defense in defenses}
        loader = DataLoader(indexed, batch_size=batch_size, collate_fn=task.collate)
        for batch in tqdm(loader, desc=setting.name, disable=not progress):
            images = batch["image"]
            if setting.patch is not None:
                images, masks = place_patches(images, setting.patch, batch["index"], seed, setting.physical)
            else:
                masks = torch.zeros(images.shape[0], 1, *images.shape[-2:])
            indices = [int(i) for i in batch["index"]]
            for defense in defenses:
                with torch.no_grad():
                    result = defense(images)
                task.update_metric(accumulators[defense.name], result.output, batch, masks)
                record = metrics[defense.name]
                record.indices += indices
                if result.score is not None:
                    record.scores += result.score.float().cpu().tolist()
                if result.flagged is not None:
                    record.flagged += result.flagged.cpu().tolist()
                if result.mask is not None and setting.patch is not None:
                    record.mask_iou += _iou(result.mask, masks)
                for name, (score, flagged) in result.extra.items():
                    observed = metrics.setdefault(name, DefenseMetrics())
                    observed.indices += indices
                    observed.scores += score.float().cpu().tolist()
                    if flagged is not None:
                        observed.flagged += flagged.cpu().tolist()
                if len(examples) < keep_examples and setting.patch is not None:
                    examples.append({"setting": setting.name, "defense": defense.name, "image": images[0], "output": first_output(result.output), "mask": masks[0]})
        for name, record in metrics.items():
            if name in accumulators:
                record.task, record.metric = accumulators[name].compute(), accumulators[name]
            record.gather()
        results[setting.name] = metrics
    return results, examples


def _iou(predicted: torch.Tensor, true: torch.Tensor) -> list[float]:
    return mask_iou(predicted.cpu(), true.cpu()).tolist()


def first_output(output: Any) -> Any:
    """The first image's entry of a batched task output (a tensor's first row, a list's first dict), on the CPU."""
    if isinstance(output, torch.Tensor):
        return output[0].detach().cpu()
    return {k: v.detach().cpu() if torch.is_tensor(v) else v for k, v in output[0].items()}
