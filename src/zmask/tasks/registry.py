"""The task registry: segmentation, detection, and whatever a user registers (classification...)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, TypeGuard, TypeVar

import torch

from ..contracts import PresetTask, Task
from ..registry import Registry

TASKS: Registry[type[Task]] = Registry("task")

TaskType = TypeVar("TaskType", bound=type[Task])


def register_task(cls: TaskType) -> TaskType:
    """Class decorator: make a :class:`~zmask.contracts.Task` implementation available by its ``name``."""
    TASKS.register(cls.name)(cls)
    return cls


def is_preset_task(task_type: type[Task]) -> TypeGuard[type[PresetTask]]:
    """Whether a task class also gives the paper's Z-Mask configuration (``paper_config``, a
    :class:`~zmask.contracts.PresetTask`), as model presets need."""
    return callable(getattr(task_type, "paper_config", None))


def stack_items(items: Sequence[Mapping[str, Any]], stacked: Sequence[str] = ("image",), listed: Sequence[str] = ()) -> dict[str, Any]:
    """A batch dict: the ``stacked`` keys stacked into tensors, the ``listed`` keys (and ``index``) kept as lists."""
    batch: dict[str, Any] = {key: torch.stack([item[key] for item in items]) for key in stacked if key in items[0]}
    for key in (*listed, "index"):
        if key in items[0]:
            batch[key] = [item[key] for item in items]
    return batch
