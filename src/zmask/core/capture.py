"""Read the outputs of named layers of any ``nn.Module`` in one forward pass."""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Literal

import torch
from torch import nn
from ..errors import InputError

RepeatPolicy = Literal["error", "first", "last"]
_SELECTOR = re.compile(r"^(?P<module>[^\[\]]+?)(?:\[(?P<index>\d+)\])?$")


def parse_layer_name(name: str) -> tuple[str, int | None]:
    """Split ``"module.path[i]"`` into the module path and the optional output index."""
    match = _SELECTOR.match(name)
    if not match:
        raise InputError(f"invalid layer name {name!r}: use a module path such as 'encoder.b1', optionally 'name[0]'")
    index = match.group("index")
    return match.group("module"), None if index is None else int(index)


def resolve_modules(model: nn.Module, layer_names: Sequence[str]) -> dict[str, nn.Module]:
    """Map each layer name to its module; unknown names raise ``ValueError`` with close matches."""
    modules = dict(model.named_modules())
    resolved: dict[str, nn.Module] = {}
    for name in layer_names:
        path, _ = parse_layer_name(name)
        if path not in modules:
            close = difflib.get_close_matches(path, list(modules), n=3)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise InputError(
                f"model {type(model).__name__} has no layer {path!r}{hint} "
                "(list its layer names with `zmask models --layers PRESET` (a preset name or module:factory) "
                "or `dict(model.named_modules())`)"
            )
        resolved[name] = modules[path]
    return resolved


class ActivationCapture:
    """Forward hooks that record the outputs of the named layers.

    Outputs are cloned (so in-place operations further down the network cannot change them) and
    stay on the autograd graph when gradients are enabled. With ``clone=False`` the outputs are
    kept as they are, and :meth:`modified` names those that the rest of the forward pass changed
    in place (their version counter moved), so a caller can redo the pass with clones. A layer whose module returns a tuple or
    list must be named with an index, ``"name[0]"``. A module that runs more than once per forward
    pass raises unless ``on_repeat`` is ``"first"`` or ``"last"``.

    Use as a context manager around the forward pass::

        with ActivationCapture(model, ["layer1", "layer4"]) as capture:
            output = model(x)
        activations = capture.activations
    """

    def __init__(self, model: nn.Module, layer_names: Sequence[str], on_repeat: RepeatPolicy = "error", clone: bool = True) -> None:
        if on_repeat not in ("error", "first", "last"):
            raise InputError(f"on_repeat={on_repeat!r} must be 'error', 'first' or 'last'")
        self.layer_names = tuple(dict.fromkeys(layer_names))
        self.on_repeat = on_repeat
        self.clone = clone
        self._versions: dict[str, tuple[torch.Tensor, int]] = {}
        self._modules = resolve_modules(model, self.layer_names)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self.activations: dict[str, torch.Tensor] = {}

    def __enter__(self) -> ActivationCapture:
        self.activations = {}
        self._versions = {}
        for name, module in self._modules.items():
            self._handles.append(module.register_forward_hook(self._make_hook(name)))
        return self

    def __exit__(self, *exc_info: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def modified(self) -> list[str]:
        """Layers whose output tensor was changed in place after it was captured."""
        return [name for name, (tensor, version) in self._versions.items() if tensor._version != version]

    def missing(self) -> list[str]:
        """Layers that did not run during the forward pass."""
        return [name for name in self.layer_names if name not in self.activations]

    def require_all(self) -> dict[str, torch.Tensor]:
        """The captured activations; raises if a layer never ran."""
        missing = self.missing()
        if missing:
            raise InputError(f"layers {missing} did not run in the forward pass; choose layers on the path of the input")
        return self.activations

    def _make_hook(self, name: str):
        _, index = parse_layer_name(name)

        def hook(module: nn.Module, inputs: object, output: object) -> None:
            tensor = _select_output(name, output, index)
            if name in self.activations:
                if self.on_repeat == "error":
                    raise InputError(
                        f"layer {name!r} ran more than once in one forward pass (a shared module); "
                        "pick another layer or pass on_repeat='first' or 'last'"
                    )
                if self.on_repeat == "first":
                    return
            self._versions[name] = (tensor, tensor._version)
            self.activations[name] = tensor.clone() if self.clone else tensor

        return hook


def _select_output(name: str, output: object, index: int | None) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        if index is not None:
            raise InputError(f"layer {name!r} returns a single tensor; drop the [{index}] selector")
        return output
    if isinstance(output, (tuple, list)):
        if index is None:
            raise InputError(
                f"layer {name!r} returns a {type(output).__name__} of {len(output)} items; "
                f"name one of them, e.g. '{name}[0]'"
            )
        if index >= len(output) or not isinstance(output[index], torch.Tensor):
            raise InputError(f"layer {name!r}: output item {index} is not a tensor")
        return output[index]
    raise InputError(f"layer {name!r} returns {type(output).__name__}, not a tensor; choose another layer")


def run_and_capture(model: nn.Module, images: torch.Tensor, layer_names: Sequence[str],
                    on_repeat: RepeatPolicy = "error", clone: bool = True) -> tuple[object, dict[str, torch.Tensor]]:
    """(model output, activations of every named layer) of one forward pass of ``model`` on ``images``.

    With ``clone=False`` no layer output is copied; if the forward pass changed one of them in
    place afterwards, the pass is run again with copies, so the activations are always the layer
    outputs as they were produced.
    """
    with ActivationCapture(model, layer_names, on_repeat, clone=clone) as capture:
        output = model(images)
    if not clone and capture.modified():
        return run_and_capture(model, images, layer_names, on_repeat, clone=True)
    return output, capture.require_all()


def deepest_layer(model: nn.Module, layers: Sequence[str], probe: torch.Tensor) -> str:
    """The layer of ``layers`` with the coarsest output on ``probe`` (smallest H x W, then most channels)."""
    with torch.no_grad():
        _, activations = run_and_capture(model, probe, layers)
    shapes = {name: activations[name].shape for name in layers}
    return min(layers, key=lambda name: (shapes[name][-2] * shapes[name][-1], -shapes[name][1]))


@contextmanager
def capture_activations(model: nn.Module, layer_names: Sequence[str], on_repeat: RepeatPolicy = "error") -> Iterator[ActivationCapture]:
    """Functional form of :class:`ActivationCapture`."""
    with ActivationCapture(model, layer_names, on_repeat) as capture:
        yield capture
