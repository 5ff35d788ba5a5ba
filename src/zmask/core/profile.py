"""Profiles: a fitted defense saved as one safetensors file, safe to load from untrusted sources.

Tensors (statistics, fusion parameters) are safetensors; everything else is JSON in the file's
metadata: format name and version, the configuration, layer names and channel counts, lambda0,
and a SHA-256 over all tensor bytes that is checked on load. Nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file

from .. import __version__
from ..config import ZMaskConfig
from ..errors import ProfileError
from .capture import resolve_modules
from .fusion import PARAMETER_NAMES, FusionBlock
from .statistics import LayerStatistics

if TYPE_CHECKING:
    from ..defense import ZMask

FORMAT_NAME = "zmask-profile"
FORMAT_VERSION = 1
MAX_PROFILE_BYTES = 256 * 1024 * 1024
MAX_HEADER_BYTES = 16 * 1024 * 1024


def _tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def save_profile(defense: ZMask, path: str | Path) -> Path:
    """Write ``defense``'s fitted state to ``path`` (a ``.safetensors`` file)."""
    if defense.statistics is None:
        raise ProfileError("nothing to save: the defense has no statistics yet (call fit_statistics first)")
    tensors: dict[str, torch.Tensor] = {}
    for name, stats in defense.statistics.items():
        tensors[f"statistics/{name}/mean"] = stats.mean.detach().float().cpu().contiguous()
        tensors[f"statistics/{name}/std"] = stats.std.detach().float().cpu().contiguous()
    for name, value in defense.fusion.values().items():
        tensors[f"fusion/{name}"] = torch.tensor([value], dtype=torch.float32)
    calibration = defense.calibration.__dict__ if defense.calibration is not None else None
    metadata = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "zmask_version": __version__,
        "config": json.dumps(defense.config.to_dict()),
        "layers": json.dumps({name: stats.channels for name, stats in defense.statistics.items()}),
        "threshold": json.dumps(defense.threshold),
        "calibration": json.dumps(calibration),
        "input_size": json.dumps(defense.fit_input_size),
        "model_class": type(defense.model).__name__,
        "tensors_sha256": _tensor_digest(tensors),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)
    return path


def read_profile(path: str | Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """Read and verify a profile file: (metadata, tensors). Raises ``ProfileError`` on any defect."""
    path = Path(path)
    if not path.is_file():
        raise ProfileError(f"profile {path} does not exist or is not a file")
    size = path.stat().st_size
    if size > MAX_PROFILE_BYTES:
        raise ProfileError(f"profile {path} is {size} bytes, more than the {MAX_PROFILE_BYTES} allowed")
    data = path.read_bytes()
    if len(data) < 8:
        raise ProfileError(f"profile {path} is truncated ({len(data)} bytes)")
    (header_size,) = struct.unpack("<Q", data[:8])
    if header_size > min(MAX_HEADER_BYTES, len(data) - 8):
        raise ProfileError(f"profile {path} is truncated or not a safetensors file (header of {header_size} bytes)")
    try:
        header = json.loads(data[8 : 8 + header_size])
        metadata = header.get("__metadata__") or {}
        tensors = load_safetensors(data)
    except Exception as error:  # noqa: BLE001 - any parse failure means a corrupted file
        raise ProfileError(f"profile {path} is corrupted: {error}") from None
    if metadata.get("format") != FORMAT_NAME:
        raise ProfileError(f"{path} is not a zmask profile (format {metadata.get('format')!r})")
    try:
        version = int(metadata.get("format_version", "-1"))
    except ValueError:
        version = -1
    if version != FORMAT_VERSION:
        raise ProfileError(f"profile {path} has format version {metadata.get('format_version')}; this zmask reads version {FORMAT_VERSION}")
    if _tensor_digest(tensors) != metadata.get("tensors_sha256"):
        raise ProfileError(f"profile {path} is corrupted: its tensors do not match the recorded SHA-256")
    return metadata, tensors


def load_profile(path: str | Path, model: torch.nn.Module, cls: type[ZMask], check_model: bool = True, **kwargs: Any) -> ZMask:
    """Rebuild a ``cls`` defense around ``model`` from a profile, checking that the model fits it."""
    metadata, tensors = read_profile(path)
    try:
        config = ZMaskConfig.from_dict(json.loads(metadata["config"]))
        layers: dict[str, int] = json.loads(metadata["layers"])
        threshold = json.loads(metadata["threshold"])
        input_size = json.loads(metadata.get("input_size", "null"))
        statistics = {name: LayerStatistics(tensors[f"statistics/{name}/mean"], tensors[f"statistics/{name}/std"]) for name in layers}
        fusion_values = {name: tensors[f"fusion/{name}"] for name in PARAMETER_NAMES}
    except (KeyError, TypeError, ValueError, json.JSONDecodeError) as error:
        raise ProfileError(f"profile {path} is incomplete or inconsistent: {error}") from None
    for name, channels in layers.items():
        stats = statistics[name]
        if stats.mean.shape != stats.std.shape or stats.channels != channels or stats.mean.dim() != 2:
            raise ProfileError(f"profile {path}: statistics of layer {name!r} do not match its {channels} recorded channels")
    try:
        resolve_modules(model, config.layers)
    except ValueError as error:
        raise ProfileError(f"profile {path} does not fit this model: {error}") from None
    fusion = FusionBlock()
    fusion.load_values(fusion_values)
    defense = cls(model, config, statistics=statistics, fusion=fusion, threshold=threshold, **kwargs)
    defense.fit_input_size = tuple(input_size) if input_size else None
    if check_model and input_size:
        _check_channels(defense, layers, tuple(input_size), path)
    return defense


def _check_channels(defense: ZMask, layers: dict[str, int], input_size: tuple[int, int], path: str | Path) -> None:
    """Run one blank image through the model and compare every layer's channel count with the profile."""
    try:
        parameter = next(defense.model.parameters())
        device, dtype = parameter.device, parameter.dtype
    except StopIteration:
        device, dtype = torch.device("cpu"), torch.float32
    probe = torch.zeros(1, defense.config.in_channels, *input_size, device=device, dtype=dtype)
    was_training = defense.model.training
    defense.model.eval()
    try:
        with torch.no_grad():
            _, activations = defense._activations(probe)
    finally:
        defense.model.train(was_training)
    for name, channels in layers.items():
        found = activations[name].shape[1]
        if found != channels:
            raise ProfileError(
                f"profile {path} was fitted on a model whose layer {name!r} has {channels} channels; "
                f"this model's has {found}: load the profile made for this model"
            )
