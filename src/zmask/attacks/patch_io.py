"""Patch files: lossless 8-bit PNG (the physical artefact) with a JSON sidecar."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..data.io import read_image
from ..errors import ZMaskError
from ..validation import check_patch

MAX_SIDECAR_BYTES = 1024 * 1024
MAX_SIDECAR_DEPTH = 32  # the sidecars zmask writes are 3 levels deep


def sidecar_path(path: str | Path) -> Path:
    return Path(path).with_suffix(".json")


def save_patch(patch: torch.Tensor, path: str | Path, metadata: dict[str, Any] | None = None) -> Path:
    """Write ``patch`` (3 x h x w in [0, 1]) as an 8-bit RGB PNG and ``metadata`` as ``<name>.json``.

    A patch with NaN/Inf values, or values outside [0, 1] by more than rounding, is refused (an
    ``InputError``) before anything is written: 8-bit quantisation would hide the fault."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ZMaskError(f"patch files are PNG; got {path}")
    check_patch(patch, f"patch for {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = (patch.detach().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    Image.fromarray(np.ascontiguousarray(pixels), "RGB").save(path, format="PNG")
    sidecar = {"height": int(patch.shape[1]), "width": int(patch.shape[2]), **(metadata or {})}
    sidecar_path(path).write_text(json.dumps(sidecar, indent=2, default=str))
    return path


def load_patch(path: str | Path) -> tuple[torch.Tensor, dict[str, Any]]:
    """(patch 3 x h x w in [0, 1], sidecar metadata or {})."""
    patch = read_image(path)
    metadata: dict[str, Any] = {}
    sidecar = sidecar_path(path)
    if sidecar.is_file():
        if sidecar.stat().st_size > MAX_SIDECAR_BYTES:
            raise ZMaskError(f"patch sidecar {sidecar} is larger than {MAX_SIDECAR_BYTES} bytes")
        try:
            metadata = json.loads(sidecar.read_text())
        except (ValueError, RecursionError) as error:  # JSONDecodeError is a ValueError; RecursionError: nesting
            reason = "nested deeper than Python can parse" if isinstance(error, RecursionError) else str(error)
            raise ZMaskError(f"patch sidecar {sidecar} is not valid JSON: {reason}") from None
        if not isinstance(metadata, dict):
            raise ZMaskError(f"patch sidecar {sidecar} must hold a JSON object, got {type(metadata).__name__}")
        if _depth(metadata) > MAX_SIDECAR_DEPTH:
            raise ZMaskError(f"patch sidecar {sidecar} is nested more than {MAX_SIDECAR_DEPTH} levels deep")
    return patch, metadata


def _depth(value: Any) -> int:
    """Nesting depth of a JSON value (0 for a scalar), computed without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, level = stack.pop()
        deepest = max(deepest, level)
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        stack.extend((child, level + 1) for child in children)
    return deepest


def random_noise_patch(size: tuple[int, int], seed: int = 0) -> torch.Tensor:
    """The paper's control: uniform random 8-bit pixels (3 x h x w in [0, 1])."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, *size), generator=generator).float() / 255
