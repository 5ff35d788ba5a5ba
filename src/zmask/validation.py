"""Checks on user input that turn mistakes into clear errors before they reach torch."""

from __future__ import annotations

import itertools
import math
import numbers
from collections.abc import Mapping
from typing import Any

import torch
from .errors import InputError, ZMaskTypeError

# The value range of images and patches (RGB scaled to [0, 1]) and the rounding allowed beyond it
# (resampling and float16/bfloat16 round-off stay well inside it; a [0, 255] image does not).
IMAGE_RANGE: tuple[float, float] = (0.0, 1.0)
RANGE_TOLERANCE = 1e-3


def model_dtype(model: torch.nn.Module) -> torch.dtype | None:
    """The floating-point dtype the model computes in (its first floating parameter or buffer), or None."""
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        if tensor.is_floating_point():
            return tensor.dtype
    return None


def check_images(images: Any, in_channels: int = 3, name: str = "images", dtype: torch.dtype | None = None,
                 value_range: tuple[float, float] | None = IMAGE_RANGE) -> torch.Tensor:
    """Validate a B x C x H x W floating-point batch of finite values in ``value_range`` (by default
    [0, 1], the models' contract, give or take :data:`RANGE_TOLERANCE` of rounding; None: any
    finite values) and return it, converted to ``dtype`` when given (float64 or half images for a
    float32 model, float32 ones for a bfloat16 model: the model gets its own dtype instead of
    failing inside torch)."""
    if not isinstance(images, torch.Tensor):
        raise ZMaskTypeError(f"{name} must be a torch.Tensor of shape B x {in_channels} x H x W, got {type(images).__name__}")
    if images.dim() != 4:
        hint = " (add a batch dimension with x.unsqueeze(0))" if images.dim() == 3 else ""
        raise InputError(f"{name} must be 4-D (B x {in_channels} x H x W), got shape {tuple(images.shape)}{hint}")
    if not images.is_floating_point():
        raise ZMaskTypeError(f"{name} must be a floating-point tensor (e.g. uint8 / 255), got {images.dtype}")
    if images.shape[0] == 0:
        raise InputError(f"{name} is an empty batch (B = 0)")
    if images.shape[1] != in_channels:
        raise InputError(f"{name} has {images.shape[1]} channels, the model expects {in_channels} (shape {tuple(images.shape)})")
    if images.shape[2] == 0 or images.shape[3] == 0:
        raise InputError(f"{name} has an empty spatial size {tuple(images.shape[2:])}")
    if dtype is not None and images.dtype != dtype:
        images = images.to(dtype)
    check_values(images, name, value_range)
    return images


def check_values(values: torch.Tensor, name: str, value_range: tuple[float, float] | None = IMAGE_RANGE,
                 what: str = "images") -> None:
    """Refuse NaN/Inf values, and values outside ``value_range`` by more than :data:`RANGE_TOLERANCE`
    (None: any finite value), with a message that gives the expected range.

    One fused ``aminmax`` over the tensor (NaN propagates into both ends, Inf shows at an end), a
    small fraction of a model's forward pass; the finer look happens only when the check fails."""
    if values.numel() == 0:
        return
    low, high = torch.stack(torch.aminmax(values.detach())).tolist()
    bounds = value_range if value_range is not None else (-math.inf, math.inf)
    finite = math.isfinite(low) and math.isfinite(high)
    if finite and bounds[0] - RANGE_TOLERANCE <= low and high <= bounds[1] + RANGE_TOLERANCE:
        return
    if not finite:
        count = int((~torch.isfinite(values.detach())).sum())
        expected = f"; expected finite values in [{bounds[0]:g}, {bounds[1]:g}]" if value_range is not None else ""
        raise InputError(f"{name} contains NaN or Inf values ({count} of {values.numel()}){expected}")
    hint = ""
    if value_range == IMAGE_RANGE:
        if low >= -RANGE_TOLERANCE and high <= 255 + RANGE_TOLERANCE:
            hint = f": 8-bit {what} in [0, 255]? divide them by 255"
        elif low >= -1 - RANGE_TOLERANCE and high <= 1 + RANGE_TOLERANCE:
            hint = f": {what} in [-1, 1]? map them with (x + 1) / 2"
        else:
            hint = f": give RGB {what} scaled to [0, 1] (8-bit values / 255), before any normalisation by mean and std"
    raise InputError(f"{name} has values in [{low:.6g}, {high:.6g}], outside the expected range "
                     f"[{bounds[0]:g}, {bounds[1]:g}]{hint}")


def check_patch(patch: Any, name: str = "patch", channels: int = 3) -> torch.Tensor:
    """Validate a patch: a ``channels`` x h x w floating-point tensor of finite values in [0, 1]
    (give or take :data:`RANGE_TOLERANCE`); returns it unchanged."""
    if not isinstance(patch, torch.Tensor):
        raise ZMaskTypeError(f"{name} must be a torch.Tensor of shape {channels} x h x w, got {type(patch).__name__}")
    if patch.dim() != 3 or patch.shape[0] != channels or patch.shape[1] == 0 or patch.shape[2] == 0:
        raise InputError(f"{name} must be {channels} x h x w with h, w >= 1, got shape {tuple(patch.shape)}")
    if not patch.is_floating_point():
        raise ZMaskTypeError(f"{name} must be a floating-point tensor in [0, 1] (e.g. uint8 / 255), got {patch.dtype}")
    check_values(patch, name, IMAGE_RANGE, what="patches")
    return patch


def check_limit(limit: Any, name: str = "limit") -> int | None:
    """``limit`` (how many items of a dataset to use) as a positive int, or None for all of them;
    0, negative numbers (``items[:-1]`` would silently drop the last one), bools, fractions and
    strings are refused."""
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, numbers.Integral):
        raise ZMaskTypeError(f"{name} must be a positive integer (or None for every item), got {limit!r} ({type(limit).__name__})")
    if limit < 1:
        raise InputError(f"{name}={limit} must be a positive integer (or None for every item)")
    return int(limit)


def check_threshold(value: Any, name: str = "threshold") -> float | None:
    """lambda0 as a float (or None: not calibrated). A string, bool or NaN is refused by name;
    +-inf are allowed (never / always flag)."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.dtype == torch.bool:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ZMaskTypeError(f"{name} must be a number (or None before calibration), got {value!r} ({type(value).__name__})")
    if math.isnan(value):
        raise InputError(f"{name} is NaN: no score would ever be flagged")
    return float(value)


def check_masks(masks: Any, images: torch.Tensor, name: str = "masks") -> torch.Tensor:
    """Validate binary patch masks matching ``images`` (B x H x W or B x 1 x H x W); returns B x 1 x H x W float."""
    if not isinstance(masks, torch.Tensor):
        raise ZMaskTypeError(f"{name} must be a torch.Tensor, got {type(masks).__name__}")
    if masks.dim() == 3:
        masks = masks.unsqueeze(1)
    expected = (images.shape[0], 1, *images.shape[2:])
    if tuple(masks.shape) != expected:
        raise InputError(f"{name} must have shape {expected} (one binary mask per image), got {tuple(masks.shape)}")
    masks = masks.float()
    if ((masks != 0) & (masks != 1)).any():
        raise InputError(f"{name} must be binary (0 outside the patch, 1 on it)")
    return masks


def batch_images(batch: Any) -> torch.Tensor:
    """The image tensor of a batch from a DataLoader: a tensor, the first item of a tuple, or batch['image']."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, Mapping):
        if "image" not in batch:
            raise InputError(f"batch dictionaries must hold an 'image' entry, got keys {sorted(batch)}")
        return batch["image"]
    if isinstance(batch, (tuple, list)) and batch:
        return batch[0]
    raise ZMaskTypeError(f"cannot find images in a batch of type {type(batch).__name__}")


def batch_occluded(batch: Any, masks: torch.Tensor) -> torch.Tensor | None:
    """Which images of a calibration batch are clean images carrying a harmless occluder (B bool),
    or None when the batch does not say: the third item of an (images, patch_masks, occluded)
    tuple, or a dict's 'occluded'. An occluded image is a negative: its patch mask must be empty."""
    occluded = batch.get("occluded") if isinstance(batch, Mapping) else (batch[2] if isinstance(batch, (tuple, list)) and len(batch) > 2 else None)
    if occluded is None:
        return None
    if not isinstance(occluded, torch.Tensor) or occluded.shape != masks.shape[:1]:
        raise InputError(f"'occluded' must be a tensor of {masks.shape[0]} booleans (one per image), got "
                         f"{tuple(occluded.shape) if isinstance(occluded, torch.Tensor) else type(occluded).__name__}")
    occluded = occluded.to(masks.device).bool()
    if (occluded & (masks.flatten(1).amax(1) > 0)).any():
        raise InputError("an image marked 'occluded' (a clean image with a harmless occluder) has a non-empty patch mask: "
                         "mark only negatives")
    return occluded


def batch_images_and_masks(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, patch masks) of a batch: a pair/tuple or a dict with 'image' and 'patch_mask'."""
    if isinstance(batch, Mapping):
        if "image" not in batch or "patch_mask" not in batch:
            raise InputError(f"batch dictionaries must hold 'image' and 'patch_mask', got keys {sorted(batch)}")
        return batch["image"], batch["patch_mask"]
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise ZMaskTypeError("fusion and calibration batches must be (images, patch_masks) pairs or dicts with 'image' and 'patch_mask'")
