"""Wiring of presets, datasets and attacks used by the command line and the experiments."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from .assets import asset_path
from .attacks import AttackConfig, AttackResult, PatchAttack, patch_size
from .data import CamVid, CocoDetection, LetterboxedDetection
from .data.cache import CachedDataset
from .errors import ZMaskError
from .models import ModelPreset, get_preset
from .tasks import DetectionTask, SegmentationTask


def task_for(preset: ModelPreset, model: torch.nn.Module, annotation_file: str | Path | None = None):
    if preset.task == "segmentation":
        return SegmentationTask(model, preset.num_classes, preset.ignore_index, preset.class_names)
    return DetectionTask(model, annotation_file)


def default_dataset(preset: ModelPreset, split: str, limit: int | None = None, root: str | Path | None = None) -> Dataset:
    """The preset's dataset split at the preset's input size (CamVid for ESPNet-CamVid, COCO for detectors)."""
    if preset.name == "espnet_camvid":
        return CamVid(root or asset_path("camvid"), split, limit=limit)
    if preset.task == "detection":
        folder = Path(root) if root else asset_path("coco_tiny")
        year_split = {"train": "train2017", "val": "val2017"}.get(split, split)
        coco = CocoDetection(folder / year_split, folder / "annotations" / f"instances_{year_split}.json", limit=limit)
        return LetterboxedDetection(coco, preset.input_size[0])
    raise ZMaskError(f"no default dataset for preset {preset.name!r}; pass a data folder")


def annotation_file(preset: ModelPreset, split: str, root: str | Path | None = None) -> Path | None:
    if preset.task != "detection":
        return None
    folder = Path(root) if root else asset_path("coco_tiny")
    year_split = {"train": "train2017", "val": "val2017"}.get(split, split)
    return folder / "annotations" / f"instances_{year_split}.json"


def craft_patch(
    preset_name: str, size: str = "L", config: AttackConfig | None = None, profile: str | Path | None = None, split: str = "train",
    limit: int | None = None, initial: torch.Tensor | None = None, progress: bool = True, data_root=None, callback=None, **overrides: Any,
) -> tuple[AttackResult, dict[str, Any]]:
    """Craft a patch for a preset on its training split; returns the result and sidecar metadata.

    ``profile``: a fitted Z-Mask profile, needed for activation-aware (beta < 1) and defense-aware attacks.
    """
    preset = get_preset(preset_name)
    model = preset.build(True)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    defense = None
    if profile is not None:
        from .defense import ZMask

        defense = ZMask.load(profile, model)
    size_hw = patch_size(preset.task, size, preset.input_size)
    config = config or AttackConfig(patch_size=size_hw)
    config = replace(config, patch_size=size_hw, **overrides)
    data = CachedDataset(default_dataset(preset, split, limit, data_root))
    attack = PatchAttack(task_for(preset, model), config, defense)
    result = attack.run(data, initial=initial, progress=progress, callback=callback)
    final = {k: sum(h[k] for h in result.history[-10:]) / len(result.history[-10:]) for k in result.history[-1]} if result.history else {}
    metadata = {
        "model": preset_name, "task": preset.task, "size": size, "split": split, "images": len(data),
        "loss": "untargeted" if preset.task == "segmentation" else config.objective,
        "beta": config.beta, "alpha": config.alpha, "profile": str(profile) if profile else None, "defense_attack": config.defense_attack, "seed": config.seed,
        "attack": config.to_dict(), "final_loss_terms_last10": final,
    }
    return result, metadata
