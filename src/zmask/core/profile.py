"""Profiles: a fitted defense saved as one safetensors file, safe to load from untrusted sources.

Tensors (statistics, fusion parameters) are safetensors; everything else is JSON in the file's
metadata: format name and version, the configuration, layer names and channel counts, lambda0,
a fingerprint of the model's weights, and a SHA-256 over all tensor bytes that is checked on load.
Nothing is unpickled.

Loading checks the file against a schema (:func:`load_profile`): every metadata field is typed
and range-checked, sizes are bounded by the fitted input size, statistics are finite float32
tensors of the shape the layer table and the configuration say. The SHA-256 detects corruption;
it is unkeyed, so it does not prove who wrote the file: the schema is what keeps a deliberately
edited profile from making the defense silently wrong or unboundedly slow.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import numbers
import re
import struct
from pathlib import Path
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file

from .._version import __version__
from ..config import ZMaskConfig
from ..errors import ProfileError, ZMaskError
from ..fileio import atomic_write
from .calibration import Calibration
from .capture import RepeatPolicy, resolve_modules, run_and_capture
from .fusion import PARAMETER_NAMES, FusionBlock
from .extremes import LayerExtremes
from .state import FittedState
from .statistics import MIN_STD, LayerStatistics

logger = logging.getLogger(__name__)

FORMAT_NAME = "zmask-profile"
FORMAT_VERSION = 1
MAX_PROFILE_BYTES = 256 * 1024 * 1024
MAX_HEADER_BYTES = 16 * 1024 * 1024
# Schema bounds (see load_profile).
MAX_INPUT_PIXELS = 4096 * 4096  # fitted input size H x W
# The blank image that checks a profile against a model (check_model_fits) has at most this many
# pixels: larger fitted sizes are probed at a power-of-two fraction (channel counts do not depend on it).
MAX_PROBE_PIXELS = 1024 * 1024
MAX_LAYER_CHANNELS = 1 << 16
MAX_STATISTIC = 1e8  # |mu| and sigma; larger values overflow float32 heatmaps
EXTREME_KINDS = ("mean", "std", "upper")  # the tensors of a layer's channel-extreme statistics
MAX_TEXT = 256  # characters of model_class / zmask_version
MAX_PROVENANCE = 256 * 1024  # characters of the provenance record (how the profile was fitted)
# Reduced precisions a fitted model is commonly cast to: the fingerprint is recorded for each, so
# that a profile fitted in float32 still recognises its model after ``model.to(torch.bfloat16)``.
FINGERPRINT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        # reshape(-1): a 0-dim tensor cannot be viewed as bytes; the digest of others is unchanged
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


@dataclass
class Profile:
    """What a profile file holds: the configuration, the fitted state (statistics set), and the
    model it was fitted on (class name and a fingerprint of its weights)."""

    config: ZMaskConfig
    state: FittedState
    model_class: str = ""
    weights_sha256: dict[str, str] | None = None  # dtype name -> weights_fingerprint(model, dtype); None: not recorded

    @property
    def statistics(self) -> dict[str, LayerStatistics]:
        if self.state.statistics is None:
            raise ProfileError("a profile needs fitted statistics")
        return self.state.statistics

    @property
    def layers(self) -> dict[str, int]:
        """Layer name -> channel count."""
        return {name: stats.channels for name, stats in self.statistics.items()}


def save_profile(profile: Profile, path: str | Path) -> Path:
    """Write ``profile`` to ``path`` (a ``.safetensors`` file), atomically (:func:`zmask.fileio.atomic_write`)."""
    state = profile.state
    tensors: dict[str, torch.Tensor] = {}
    for name, stats in profile.statistics.items():
        tensors[f"statistics/{name}/mean"] = stats.mean.detach().float().cpu().contiguous()
        tensors[f"statistics/{name}/std"] = stats.std.detach().float().cpu().contiguous()
    for name, value in state.fusion.values().items():
        tensors[f"fusion/{name}"] = torch.tensor([value], dtype=torch.float32)
    for name, extremes in (state.extremes or {}).items():
        for kind in EXTREME_KINDS:
            tensors[f"extremes/{name}/{kind}"] = getattr(extremes, kind).detach().float().cpu().contiguous()
    metadata = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "zmask_version": __version__,
        "config": json.dumps(profile.config.to_dict()),
        "layers": json.dumps(profile.layers),
        "threshold": json.dumps(state.threshold),
        "calibration": json.dumps(_record(state.calibration)),
        "input_size": json.dumps(state.input_size),
        "model_class": profile.model_class,
        "tensors_sha256": _tensor_digest(tensors),
    }
    if profile.weights_sha256 is not None:
        metadata["weights_sha256"] = json.dumps(profile.weights_sha256)
    if state.provenance is not None:
        metadata["provenance"] = json.dumps(state.provenance)
    if state.calibration_mask_iou is not None:
        metadata["calibration_mask_iou"] = json.dumps(state.calibration_mask_iou)
    if state.extremes:
        metadata["extreme_threshold"] = json.dumps(state.extreme_threshold)
        metadata["extreme_calibration"] = json.dumps(_record(state.extreme_calibration))
    # Atomically, with the umask's mode: a full disk or a file-size limit leaves an earlier profile intact.
    return atomic_write(path, lambda temporary: save_file(tensors, str(temporary), metadata=metadata))


def _record(calibration: Calibration | None) -> dict[str, Any] | None:
    return dataclasses.asdict(calibration) if calibration is not None else None


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
    """Read, verify and decode a profile file against its schema.

    Every defect raises ``ProfileError`` naming the file and the field: a metadata field that is
    missing, not JSON, of the wrong type or out of range (heatmap and input size, dilation bounded
    by the input size, finite threshold, a typed calibration record), a layer table that does not
    match the configuration or the tensors, a statistics tensor that is not float32 of shape
    C x P or holds NaN/Inf, |mu| or sigma above ``MAX_STATISTIC``, a negative sigma or a layer
    whose every sigma is zero, non-finite fusion parameters, or tensors the schema does not know.
    """
    metadata, tensors = read_profile(path)
    return _ProfileSchema(Path(path), metadata, tensors).decode()


class _ProfileSchema:
    """Decodes one profile's metadata and tensors field by field; each failure names the field."""

    def __init__(self, path: Path, metadata: dict[str, str], tensors: dict[str, torch.Tensor]) -> None:
        self.path, self.metadata, self.tensors = path, metadata, tensors
        self.extreme_layers: tuple[str, ...] = ()

    def fail(self, field: str, problem: str) -> ProfileError:
        return ProfileError(f"profile {self.path}: field {field!r} {problem}")

    def json_field(self, name: str, required: bool = True) -> Any:
        if name not in self.metadata:
            if required:
                raise self.fail(name, "is missing from the metadata")
            return None
        try:
            return json.loads(self.metadata[name])
        except (ValueError, RecursionError, TypeError) as error:  # JSONDecodeError is a ValueError
            raise self.fail(name, f"is not valid JSON: {str(error)[:200]}") from None

    def number(self, value: Any, field: str) -> float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise self.fail(field, f"must be a number, got {_short(value)}")
        if not math.isfinite(value):
            raise self.fail(field, f"must be finite, got {value!r}")
        return float(value)

    def integer(self, value: Any, field: str, low: int, high: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(field, f"must be an integer, got {_short(value)}")
        if not low <= value <= high:
            raise self.fail(field, f"must lie in [{low}, {high}], got {value}")
        return value

    def text(self, name: str) -> str:
        value = self.metadata.get(name, "")
        if len(value) > MAX_TEXT:
            raise self.fail(name, f"is longer than {MAX_TEXT} characters")
        return value

    def decode(self) -> Profile:
        config = self.config()
        input_size = self.input_size(config)
        layers = self.layers(config)
        self.extreme_layers = config.extreme_layers
        self.unexpected_tensors(layers)
        statistics = {name: self.layer_statistics(name, channels, config.planes) for name, channels in layers.items()}
        fusion = {name: self.fusion_value(name) for name in PARAMETER_NAMES}
        threshold = self.json_field("threshold")
        threshold = None if threshold is None else self.number(threshold, "threshold")
        extremes = {name: self.layer_extremes(name, layers[name]) for name in config.extreme_layers} or None
        extreme_threshold = self.json_field("extreme_threshold", required=False)
        extreme_threshold = None if extreme_threshold is None else self.number(extreme_threshold, "extreme_threshold")
        fusion_block = FusionBlock()
        fusion_block.load_values(fusion)
        mask_iou = self.json_field("calibration_mask_iou", required=False)
        if mask_iou is not None:
            mask_iou = self.number(mask_iou, "calibration_mask_iou")
            if not 0.0 <= mask_iou <= 1.0:
                raise self.fail("calibration_mask_iou", f"must lie in [0, 1], got {mask_iou}")
        state = FittedState(statistics, fusion_block, threshold, self.calibration(), mask_iou, extremes, extreme_threshold,
                            self.calibration("extreme_calibration"), input_size, self.provenance())
        return Profile(config, state, self.text("model_class"), self.weights())

    def provenance(self) -> dict[str, Any] | None:
        if len(self.metadata.get("provenance", "")) > MAX_PROVENANCE:
            raise self.fail("provenance", f"is longer than {MAX_PROVENANCE} characters")
        value = self.json_field("provenance", required=False)
        if value is not None and not isinstance(value, dict):
            raise self.fail("provenance", f"must be a JSON object, got {_short(value)}")
        return value

    def config(self) -> ZMaskConfig:
        data = self.json_field("config")
        try:
            return ZMaskConfig.from_dict(data)
        except (ZMaskError, TypeError, ValueError) as error:
            raise self.fail("config", f"is invalid: {error}") from None

    def input_size(self, config: ZMaskConfig) -> tuple[int, int] | None:
        value = self.json_field("input_size", required=False)
        if value is None:
            return None
        if not isinstance(value, list) or len(value) != 2:
            raise self.fail("input_size", f"must be a [height, width] pair, got {_short(value)}")
        height, width = (self.integer(v, "input_size", 1, MAX_INPUT_PIXELS) for v in value)
        if height * width > MAX_INPUT_PIXELS:
            raise self.fail("input_size", f"{height}x{width} has more than the {MAX_INPUT_PIXELS} pixels allowed")
        heatmap = config.heatmap_size
        if heatmap[0] > height or heatmap[1] > width:
            raise self.fail("config.heatmap_size", f"{heatmap} is larger than the fitted input size {(height, width)}")
        if config.mask_dilation > max(height, width):
            raise self.fail("config.mask_dilation", f"{config.mask_dilation} is larger than the fitted input size {(height, width)}")
        return height, width

    def layers(self, config: ZMaskConfig) -> dict[str, int]:
        value = self.json_field("layers")
        if not isinstance(value, dict):
            raise self.fail("layers", f"must map layer names to channel counts, got {_short(value)}")
        layers = {name: self.integer(channels, f"layers.{name}", 1, MAX_LAYER_CHANNELS) for name, channels in value.items()}
        missing = [name for name in config.layers if name not in layers]
        extra = [name for name in layers if name not in config.layers]
        if missing or extra:
            raise self.fail("layers", f"does not match the configuration's layers: missing {missing}, not configured {extra}")
        return {name: layers[name] for name in config.layers}

    def unexpected_tensors(self, layers: dict[str, int]) -> None:
        known = {f"statistics/{name}/{kind}" for name in layers for kind in ("mean", "std")}
        known |= {f"fusion/{name}" for name in PARAMETER_NAMES}
        known |= {f"extremes/{name}/{kind}" for name in self.extreme_layers for kind in EXTREME_KINDS}
        extra = sorted(set(self.tensors) - known)
        if extra:
            raise self.fail(extra[0], f"is not a tensor of this profile format ({len(extra)} unexpected tensors)")

    def tensor(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if name not in self.tensors:
            raise self.fail(name, "is missing from the tensors")
        tensor = self.tensors[name]
        if tensor.dtype != torch.float32:
            raise self.fail(name, f"has dtype {tensor.dtype}, expected torch.float32")
        if tuple(tensor.shape) != shape:
            raise self.fail(name, f"has shape {tuple(tensor.shape)}, expected {shape}")
        if not torch.isfinite(tensor).all():
            raise self.fail(name, "holds NaN or Inf values")
        return tensor

    def layer_statistics(self, name: str, channels: int, planes: int) -> LayerStatistics:
        shape = (channels, planes)  # the layer table's channels x the configuration's planes
        mean = self.tensor(f"statistics/{name}/mean", shape)
        std = self.tensor(f"statistics/{name}/std", shape)
        if mean.abs().max() > MAX_STATISTIC:
            raise self.fail(f"statistics/{name}/mean", f"holds |mu| = {float(mean.abs().max()):.3g}, more than {MAX_STATISTIC:g}")
        if std.min() < MIN_STD or std.max() > MAX_STATISTIC:
            # Fitting stores a channel that is constant on the clean data with sigma = MIN_STD
            # (zmask.core.statistics), so a smaller sigma was not written by a fit.
            raise self.fail(f"statistics/{name}/std", f"must lie in [{MIN_STD:g}, {MAX_STATISTIC:g}] (a fit stores constant "
                            f"channels at {MIN_STD:g}), holds [{float(std.min()):.3g}, {float(std.max()):.3g}]")
        if not bool((std > MIN_STD).any()):
            raise self.fail(f"statistics/{name}/std", "is constant for every channel: no layer without variation on clean data can have been fitted")
        return LayerStatistics(mean, std)

    def layer_extremes(self, name: str, channels: int) -> LayerExtremes:
        values = {kind: self.tensor(f"extremes/{name}/{kind}", (channels,)) for kind in EXTREME_KINDS}
        for kind, tensor in values.items():
            if tensor.abs().max() > MAX_STATISTIC:
                raise self.fail(f"extremes/{name}/{kind}", f"holds |value| = {float(tensor.abs().max()):.3g}, more than {MAX_STATISTIC:g}")
        if values["std"].min() <= 0:
            raise self.fail(f"extremes/{name}/std", "must be positive (the std of clean channel maxima, at least 1e-6)")
        return LayerExtremes(**values)

    def fusion_value(self, name: str) -> float:
        return float(self.tensor(f"fusion/{name}", (1,))[0])

    def calibration(self, field_name: str = "calibration") -> Calibration | None:
        value = self.json_field(field_name, required=False)
        if value is None:
            return None
        fields = [f.name for f in dataclasses.fields(Calibration)]
        if not isinstance(value, dict) or sorted(value) != sorted(fields):
            keys = sorted(map(str, value)) if isinstance(value, dict) else _short(value)
            raise self.fail(field_name, f"must be a record with the fields {fields}, got {keys}")
        record: dict[str, Any] = {}
        for key in fields:
            if key == "criterion":
                if not isinstance(value[key], str) or len(value[key]) > MAX_TEXT:
                    raise self.fail(f"{field_name}.criterion", f"must be a short string, got {_short(value[key])}")
                record[key] = value[key]
                continue
            record[key] = self.number(value[key], f"{field_name}.{key}")
            if key != "threshold" and not 0.0 <= record[key] <= 1.0:
                raise self.fail(f"{field_name}.{key}", f"must lie in [0, 1], got {record[key]}")
        return Calibration(**record)

    def weights(self) -> dict[str, str] | None:
        value = self.json_field("weights_sha256", required=False)
        if value is None:
            return None
        names = [str(dtype).removeprefix("torch.") for dtype in FINGERPRINT_DTYPES]
        if (not isinstance(value, dict) or not value or not set(value) <= set(names)
                or not all(isinstance(v, str) and re.fullmatch("[0-9a-f]{64}", v) for v in value.values())):
            raise self.fail("weights_sha256", f"must map some of {names} to SHA-256 hex digests, got {_short(value)}")
        return value


def _short(value: Any) -> str:
    """A value for an error message, cut to a readable length."""
    text = repr(value)
    return f"{text[:80]}... ({type(value).__name__})" if len(text) > 80 else f"{text} ({type(value).__name__})"


def weights_fingerprint(model: torch.nn.Module, dtype: torch.dtype | None = None) -> str:
    """SHA-256 over the model's parameters and buffers (its ``state_dict`` tensors in name order:
    name, dtype, shape, bytes). ``dtype``: the fingerprint the model would have after
    ``model.to(dtype)`` (floating-point tensors cast first)."""
    digest = hashlib.sha256()
    state = model.state_dict()
    for name in sorted(state):
        tensor = state[name]
        if not isinstance(tensor, torch.Tensor):
            continue
        tensor = tensor.detach()
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        tensor = tensor.cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def weights_fingerprints(model: torch.nn.Module) -> dict[str, str]:
    """The fingerprint of ``model`` as it would be in each of ``FINGERPRINT_DTYPES``, keyed by dtype name."""
    return {str(dtype).removeprefix("torch."): weights_fingerprint(model, dtype) for dtype in FINGERPRINT_DTYPES}


def check_weights(profile: Profile, model: torch.nn.Module, path: str | Path, allow_other_weights: bool = False) -> None:
    """Fail with ``ProfileError`` unless ``model`` holds the weights the profile was fitted on.

    A profile records a fingerprint of its model's weights (also as cast to bfloat16 / float16);
    ``model`` matches if its own fingerprint, cast to one of those dtypes, equals the recorded one.
    Profiles without a fingerprint (older files) load with a logged warning.
    """
    if allow_other_weights:
        return
    if not profile.weights_sha256:
        logger.warning("profile %s records no fingerprint of its model's weights (an older profile): "
                       "it cannot be checked against this model's weights", path)
        return
    floating = [t.dtype for t in model.state_dict().values() if isinstance(t, torch.Tensor) and t.is_floating_point()]
    own = str(max(set(floating), key=floating.count)).removeprefix("torch.") if floating else None
    for name in sorted(profile.weights_sha256, key=lambda n: n != own):  # the model's own dtype first
        if weights_fingerprint(model, getattr(torch, name)) == profile.weights_sha256[name]:
            return
    raise ProfileError(
        f"profile {path} was fitted on other weights than this model's (its weights fingerprint differs): "
        "load the profile fitted for these weights, or pass allow_other_weights=True (zmask defend/evaluate: "
        "--allow-other-weights) to use it anyway"
    )


def probe_input_size(input_size: tuple[int, int]) -> tuple[int, int]:
    """The fitted size, halved until it has at most ``MAX_PROBE_PIXELS`` pixels (bounds the cost of
    checking a crafted profile with a huge ``input_size``; halving keeps the strides' multiples)."""
    height, width = input_size
    while height * width > MAX_PROBE_PIXELS and height % 2 == 0 and width % 2 == 0:
        height, width = height // 2, width // 2
    while height * width > MAX_PROBE_PIXELS:
        height, width = max(1, height // 2), max(1, width // 2)
    return height, width


def check_model_fits(profile: Profile, model: torch.nn.Module, path: str | Path, on_repeat: RepeatPolicy = "error") -> None:
    """Fail with ``ProfileError`` unless ``model`` has the profile's layers with the recorded channel
    counts (one blank image of the fitted input size is run through it)."""
    try:
        resolve_modules(model, profile.config.layers)
    except ValueError as error:
        raise ProfileError(f"profile {path} does not fit this model: {error}") from None
    input_size = profile.state.input_size
    if not input_size:
        return
    probe_size = probe_input_size(input_size)
    try:
        parameter = next(model.parameters())
        device, dtype = parameter.device, parameter.dtype
    except StopIteration:
        device, dtype = torch.device("cpu"), torch.float32
    probe = torch.zeros(1, profile.config.in_channels, *probe_size, device=device, dtype=dtype)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            _, activations = run_and_capture(model, probe, profile.config.layers, on_repeat)
    except RuntimeError as error:  # e.g. config.in_channels differs from the model's input channels
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ProfileError(
            f"profile {path} does not fit this model: it fails on a blank 1 x {profile.config.in_channels} x "
            f"{probe_size[0]} x {probe_size[1]} image (fields 'config.in_channels', 'input_size'): {first_line}"
        ) from None
    finally:
        model.train(was_training)
    for name, channels in profile.layers.items():
        found = activations[name].shape[1]
        if found != channels:
            raise ProfileError(
                f"profile {path} was fitted on a model whose layer {name!r} has {channels} channels; "
                f"this model's has {found}: load the profile made for this model"
            )
