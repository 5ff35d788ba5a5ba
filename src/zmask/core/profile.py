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
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file

from .._version import __version__
from ..config import ZMaskConfig
from ..errors import ProfileError
from .capture import RepeatPolicy, resolve_modules, run_and_capture
from .fusion import PARAMETER_NAMES
from .statistics import LayerStatistics

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


@dataclass
class Profile:
    """A fitted defense's state, as stored in a profile file."""

    config: ZMaskConfig
    statistics: dict[str, LayerStatistics]
    fusion: dict[str, float]
    threshold: float | None = None
    calibration: dict[str, Any] | None = None
    input_size: tuple[int, int] | None = None
    model_class: str = ""

    @property
    def layers(self) -> dict[str, int]:
        """Layer name -> channel count."""
        return {name: stats.channels for name, stats in self.statistics.items()}


def save_profile(profile: Profile, path: str | Path) -> Path:
    """Write ``profile`` to ``path`` (a ``.safetensors`` file)."""
    tensors: dict[str, torch.Tensor] = {}
    for name, stats in profile.statistics.items():
        tensors[f"statistics/{name}/mean"] = stats.mean.detach().float().cpu().contiguous()
        tensors[f"statistics/{name}/std"] = stats.std.detach().float().cpu().contiguous()
    for name, value in profile.fusion.items():
        tensors[f"fusion/{name}"] = torch.tensor([value], dtype=torch.float32)
    metadata = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "zmask_version": __version__,
        "config": json.dumps(profile.config.to_dict()),
        "layers": json.dumps(profile.layers),
        "threshold": json.dumps(profile.threshold),
        "calibration": json.dumps(profile.calibration),
        "input_size": json.dumps(profile.input_size),
        "model_class": profile.model_class,
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


def load_profile(path: str | Path) -> Profile:
    """Read, verify and decode a profile file; any defect raises ``ProfileError`` naming the file."""
    metadata, tensors = read_profile(path)
    try:
        config = ZMaskConfig.from_dict(json.loads(metadata["config"]))
        layers: dict[str, int] = json.loads(metadata["layers"])
        threshold = json.loads(metadata["threshold"])
        calibration = json.loads(metadata.get("calibration", "null"))
        input_size = json.loads(metadata.get("input_size", "null"))
        statistics = {name: LayerStatistics(tensors[f"statistics/{name}/mean"], tensors[f"statistics/{name}/std"]) for name in layers}
        fusion = {name: float(tensors[f"fusion/{name}"].reshape(-1)[0]) for name in PARAMETER_NAMES}
    except (KeyError, TypeError, ValueError, IndexError, json.JSONDecodeError) as error:
        raise ProfileError(f"profile {path} is incomplete or inconsistent: {error}") from None
    for name, channels in layers.items():
        stats = statistics[name]
        if stats.mean.shape != stats.std.shape or stats.channels != channels or stats.mean.dim() != 2:
            raise ProfileError(f"profile {path}: statistics of layer {name!r} do not match its {channels} recorded channels")
    return Profile(config, statistics, fusion, threshold, calibration, tuple(input_size) if input_size else None,
                   metadata.get("model_class", ""))


def check_model_fits(profile: Profile, model: torch.nn.Module, path: str | Path, on_repeat: RepeatPolicy = "error") -> None:
    """Fail with ``ProfileError`` unless ``model`` has the profile's layers with the recorded channel
    counts (one blank image of the fitted input size is run through it)."""
    try:
        resolve_modules(model, profile.config.layers)
    except ValueError as error:
        raise ProfileError(f"profile {path} does not fit this model: {error}") from None
    if not profile.input_size:
        return
    try:
        parameter = next(model.parameters())
        device, dtype = parameter.device, parameter.dtype
    except StopIteration:
        device, dtype = torch.device("cpu"), torch.float32
    probe = torch.zeros(1, profile.config.in_channels, *profile.input_size, device=device, dtype=dtype)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            _, activations = run_and_capture(model, probe, profile.config.layers, on_repeat)
    finally:
        model.train(was_training)
    for name, channels in profile.layers.items():
        found = activations[name].shape[1]
        if found != channels:
            raise ProfileError(
                f"profile {path} was fitted on a model whose layer {name!r} has {channels} channels; "
                f"this model's has {found}: load the profile made for this model"
            )
