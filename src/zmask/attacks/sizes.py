"""The paper's patch sizes (spec section 5), scaled to other input sizes."""

from __future__ import annotations

from ..errors import ZMaskError

# (width, height) at the paper's input sizes.
_PAPER_SIZES = {
    "segmentation": ((2048, 1024), {"L": (600, 300), "M": (400, 200), "S": (300, 150)}),
    "detection": ((640, 640), {"L": (200, 200), "M": (150, 150), "S": (100, 100)}),
}


def patch_size(task: str, size: str, input_size: tuple[int, int]) -> tuple[int, int]:
    """(height, width) of the paper's S/M/L patch for ``task``, scaled to ``input_size`` (H, W)."""
    if task not in _PAPER_SIZES:
        raise ZMaskError(f"unknown task {task!r}; use 'segmentation' or 'detection'")
    (paper_w, paper_h), sizes = _PAPER_SIZES[task]
    if size not in sizes:
        raise ZMaskError(f"unknown patch size {size!r}; use one of {sorted(sizes)}")
    width, height = sizes[size]
    return max(1, round(height * input_size[0] / paper_h)), max(1, round(width * input_size[1] / paper_w))
