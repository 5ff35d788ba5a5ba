"""The paper's patch sizes (spec section 5), scaled to other input sizes."""

from __future__ import annotations

from ..contracts import Task
from ..errors import ZMaskError


def patch_size(task: str | type[Task] | Task, size: str, input_size: tuple[int, int]) -> tuple[int, int]:
    """(height, width) of the paper's S/M/L patch for ``task`` (a task, or its name in ``zmask.tasks.TASKS``),
    scaled to ``input_size`` (H, W)."""
    if isinstance(task, str):
        from ..tasks import TASKS

        task = TASKS.get(task)
    (paper_h, paper_w), sizes = task.paper_patch_sizes
    if size not in sizes:
        raise ZMaskError(f"unknown patch size {size!r}; use one of {sorted(sizes)}")
    height, width = sizes[size]
    return max(1, round(height * input_size[0] / paper_h)), max(1, round(width * input_size[1] / paper_w))
