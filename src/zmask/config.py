"""Configuration of a Z-Mask defense (which layers, which kernels, which variants)."""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal
from .errors import ConfigError, ZMaskTypeError

Kernel = tuple[int, int]

# The paper's kernels (height, width), for the heatmap sizes it used (spec section 1.4).
PAPER_SEGMENTATION_HEATMAP: tuple[int, int] = (150, 300)
PAPER_SEGMENTATION_SHALLOW_KERNELS: tuple[Kernel, ...] = ((64, 128), (32, 64), (16, 32), (8, 16))
PAPER_SEGMENTATION_DEEP_KERNELS: tuple[Kernel, ...] = ((64, 128), (32, 64))
PAPER_DETECTION_HEATMAP: tuple[int, int] = (400, 500)
PAPER_DETECTION_SHALLOW_KERNELS: tuple[Kernel, ...] = ((40, 40), (25, 25), (10, 10))
PAPER_DETECTION_DEEP_KERNELS: tuple[Kernel, ...] = ((80, 80), (40, 40))

# Bounds that keep the work per frame bounded whatever a configuration (or a profile) says.
MAX_HEATMAP_ELEMENTS = 2048 * 2048  # H_R * W_R; the paper's largest heatmap is 400 x 500
MAX_MASK_DILATION = 4096  # input pixels; a profile also bounds it by its input size
MAX_IN_CHANNELS = 64
MAX_CHUNK_ELEMENTS = 2**31
MAX_KERNELS = 16  # per set; the paper uses 4 and 2
MAX_CANDIDATE_WINDOWS = 4  # each gives up to two re-passes of a flagged image
MAX_CANDIDATE_REGIONS = 8

_CHOICES = {
    "spr_variant": ("reference", "paper"),
    "pooling": ("valid_stretch", "same"),
    "std_estimator": ("reference", "pooled"),
    "score": ("reference", "paper"),
    "box_method": ("auto", "table", "separable"),
}


def scale_kernels(kernels: tuple[Kernel, ...], from_size: tuple[int, int], to_size: tuple[int, int]) -> tuple[Kernel, ...]:
    """Scale kernels defined for heatmap ``from_size`` to heatmap ``to_size`` (at least 1x1)."""
    sh, sw = to_size[0] / from_size[0], to_size[1] / from_size[1]
    return tuple((max(1, round(kh * sh)), max(1, round(kw * sw))) for kh, kw in kernels)


@dataclass(frozen=True)
class ZMaskConfig:
    """Everything that defines a Z-Mask defense apart from fitted values.

    Attributes:
        shallow_layers: module names of the set S (fine spatial detail).
        deep_layers: module names of the set D (context); may include shallow layers.
        shallow_kernels, deep_kernels: SPR kernels (height, width), largest first.
        heatmap_size: working size H_R x W_R of all heatmaps.
        spr_variant: "reference" (authors' code, default) or "paper" (Eq. 3).
        pooling: "valid_stretch" (authors' code, default) or "same" (aligned).
        planes: number P of row-major chunks with their own statistics.
        std_estimator: "reference" (mean of per-image stds, default) or "pooled".
        eps: added to sigma in the Z-score.
        std_floor: sigma is clamped to at least this before adding eps.
        score: detection score definition, "reference" (default) or "paper".
        mask_threshold: soft-mask threshold of Eq. 4 (strict >).
        mask_dilation: grow the binary mask by this many input pixels before masking (0 = Eq. 4
            as written); covers patch borders that the heatmap resolution leaves visible.
        fill_value: value written under masked pixels, in the space the model consumes; a scalar
            or one value per input channel (0 = black for models taking [0, 1] images).
        in_channels: expected channel count of the model input.
        extreme_layers: layers (of S or D) whose channel maxima give a second detection score
            beyond the paper (``zmask.core.extremes``): an image is also flagged when its
            hyper-activation score exceeds its own threshold; both thresholds are calibrated
            together, so that the false-alarm rate of the combined flag is the one calibration
            asks for (:func:`zmask.core.calibration.calibrate_union`). Empty (the default) is the
            paper's defense.
        extreme_fpr: the largest share of clean calibration images the second score may flag on
            its own (the combined flag's rate is calibration's ``target_fpr`` or Youden's J).
        extreme_mask: also mask, on flagged images, the pixels where a channel of the extreme
            layers exceeds its clean maximum (off by default: on ESPNet-CamVid's deepest layer this
            coverage spreads far beyond the patch and costs mIoU, see the README).
        mask_candidates: beyond the paper, choose the keep-mask of a flagged image among
            candidates - Eq. 4's, the largest regions of the extreme coverage, windows of
            ``candidate_windows`` - by re-running the network on each (batched) and keeping the
            one whose re-pass has the lowest flag margin (``zmask.core.candidates``). Off (the
            default) is the paper's single re-pass.
        candidate_windows: window sizes (height, width) in input pixels for those candidates;
            ``zmask fit`` records the sizes of the patches it was fitted with.
        candidate_regions: at most this many coverage regions become candidates.
        candidate_choice: how the candidate is chosen (``zmask.core.candidates.better_candidate``):
            "clearance" (the default), the smallest mask whose re-pass is no longer flagged;
            "effect", windows tiling the image (found without reading the evidence) join the
            candidates, and among those that remove some of the evidence and hide at most twice
            the largest patch the one whose removal changes the model's output most wins
            (``zmask.core.effect``): a decoy the attacker makes look suspicious loses to the patch
            unless removing it changes the prediction more than removing the patch. Costs more
            re-passes per flagged frame.
        box_method: "auto" picks per layer the cheaper of the summed-area table and the separable
            matrices; "table"/"separable" force one (results agree to float32 round-off).
        chunk_elements: the refinement processes as many channels at once as fit this many values
            of the heatmap grid (B x channels x H_R x W_R); bounds its peak memory.
    """

    shallow_layers: tuple[str, ...]
    deep_layers: tuple[str, ...]
    shallow_kernels: tuple[Kernel, ...] = PAPER_SEGMENTATION_SHALLOW_KERNELS
    deep_kernels: tuple[Kernel, ...] = PAPER_SEGMENTATION_DEEP_KERNELS
    heatmap_size: tuple[int, int] = PAPER_SEGMENTATION_HEATMAP
    spr_variant: Literal["reference", "paper"] = "reference"
    pooling: Literal["valid_stretch", "same"] = "valid_stretch"
    planes: int = 1
    std_estimator: Literal["reference", "pooled"] = "reference"
    eps: float = 1e-5
    std_floor: float = 0.0
    score: Literal["reference", "paper"] = "reference"
    mask_threshold: float = 0.5
    mask_dilation: int = 0
    fill_value: float | tuple[float, ...] = 0.0
    in_channels: int = 3
    box_method: Literal["auto", "table", "separable"] = "auto"
    chunk_elements: int = 2**23
    extreme_layers: tuple[str, ...] = ()
    extreme_fpr: float = 0.01
    extreme_mask: bool = False
    mask_candidates: bool = False
    candidate_windows: tuple[Kernel, ...] = ()
    candidate_regions: int = 3
    candidate_choice: Literal["clearance", "effect"] = "clearance"

    def __post_init__(self) -> None:
        # Normalise lists (from JSON/YAML) into tuples so that configs compare and hash alike.
        for name in ("shallow_layers", "deep_layers", "extreme_layers"):
            value = getattr(self, name)
            if isinstance(value, str) or not isinstance(value, Iterable) or not all(isinstance(v, str) for v in value):
                raise ZMaskTypeError(f"{name} must be a sequence of module names (strings), got {value!r}")
            object.__setattr__(self, name, tuple(value))
        for name in ("shallow_kernels", "deep_kernels", "candidate_windows"):
            kernels = getattr(self, name)
            if isinstance(kernels, (str, bytes)) or not isinstance(kernels, Iterable):
                raise ZMaskTypeError(f"{name} must be a sequence of (height, width) pairs, got {kernels!r}")
            kernels = tuple(kernels)
            if len(kernels) > MAX_KERNELS:
                raise ConfigError(f"{name} has {len(kernels)} kernels, more than the {MAX_KERNELS} allowed")
            object.__setattr__(self, name, tuple(_as_pair(k, name) for k in kernels))
        object.__setattr__(self, "heatmap_size", _as_pair(self.heatmap_size, "heatmap_size"))
        if isinstance(self.fill_value, (list, tuple)):
            object.__setattr__(self, "fill_value", tuple(_real(v, "fill_value") for v in self.fill_value))
        self.validate()

    def validate(self) -> None:
        """Raise ``ConfigError`` (a ``ValueError``; ``ZMaskTypeError`` for a wrong type) naming the
        first inconsistent setting. Sizes are bounded so that no configuration makes a frame
        take unbounded time or memory."""
        for name, low, high in (("planes", 1, None), ("mask_dilation", 0, MAX_MASK_DILATION),
                                ("in_channels", 1, MAX_IN_CHANNELS), ("chunk_elements", 1, MAX_CHUNK_ELEMENTS)):
            _integer(getattr(self, name), name, low, high)
        for name in ("eps", "std_floor", "mask_threshold"):
            _real(getattr(self, name), name)
        fills = self.fill_value if isinstance(self.fill_value, tuple) else (self.fill_value,)
        for value in fills:
            _real(value, "fill_value")
        if not self.shallow_layers:
            raise ConfigError("shallow_layers (the set S) is empty: name at least one layer")
        if not self.deep_layers:
            raise ConfigError("deep_layers (the set D) is empty: name at least one layer")
        for name in ("shallow_kernels", "deep_kernels"):
            if not getattr(self, name):
                raise ConfigError(f"{name} is empty: give at least one (height, width) kernel")
        for name, choices in _CHOICES.items():
            if getattr(self, name) not in choices:
                raise ConfigError(f"{name}={getattr(self, name)!r} is not one of {choices}")
        height, width = self.heatmap_size
        if height * width > MAX_HEATMAP_ELEMENTS:
            raise ConfigError(f"heatmap_size {self.heatmap_size} has {height * width} elements, more than the "
                              f"{MAX_HEATMAP_ELEMENTS} allowed (the paper's largest heatmap is 400 x 500)")
        for kh, kw in self.shallow_kernels + self.deep_kernels:
            if kh > height or kw > width:
                raise ConfigError(
                    f"kernel ({kh}, {kw}) is larger than the heatmap size {self.heatmap_size}: "
                    "enlarge heatmap_size or scale the kernels (zmask.config.scale_kernels)"
                )
        if self.planes < 1 or (height * width) % self.planes:
            raise ConfigError(f"planes={self.planes} must be >= 1 and divide H_R*W_R={height * width}")
        if not (self.eps >= 0 and self.std_floor >= 0 and math.isfinite(self.eps + self.std_floor)):
            raise ConfigError("eps and std_floor must be finite and non-negative")
        if self.eps + self.std_floor <= 0:
            raise ConfigError("eps + std_floor must be positive, or a constant channel divides by zero")
        if self.mask_dilation < 0:
            raise ConfigError(f"mask_dilation={self.mask_dilation} must be >= 0")
        if not 0.0 < self.mask_threshold < 1.0:
            raise ConfigError(f"mask_threshold={self.mask_threshold} must lie in (0, 1)")
        if isinstance(self.fill_value, tuple) and len(self.fill_value) != self.in_channels:
            raise ConfigError(f"fill_value has {len(self.fill_value)} values for {self.in_channels} input channels")
        if self.chunk_elements < 1:
            raise ConfigError("chunk_elements must be >= 1")
        outside = [name for name in self.extreme_layers if name not in self.layers]
        if outside:
            raise ConfigError(f"extreme_layers {outside} are not layers of S or D: the extreme evidence reads only layers the analysis reads")
        if not isinstance(self.extreme_mask, bool):
            raise ZMaskTypeError(f"extreme_mask must be true or false, got {self.extreme_mask!r}")
        if not isinstance(self.mask_candidates, bool):
            raise ZMaskTypeError(f"mask_candidates must be true or false, got {self.mask_candidates!r}")
        _integer(self.candidate_regions, "candidate_regions", 0, MAX_CANDIDATE_REGIONS)
        if len(self.candidate_windows) > MAX_CANDIDATE_WINDOWS:
            raise ConfigError(f"candidate_windows has {len(self.candidate_windows)} sizes, more than the {MAX_CANDIDATE_WINDOWS} allowed")
        if any(h < 1 or w < 1 for h, w in self.candidate_windows):
            raise ConfigError(f"candidate_windows {self.candidate_windows} must be positive (height, width) sizes in input pixels")
        if self.candidate_choice not in ("clearance", "effect"):
            raise ConfigError(f"candidate_choice={self.candidate_choice!r} must be 'clearance' or 'effect'")
        if self.candidate_choice == "effect" and not self.candidate_windows:
            raise ConfigError("candidate_choice='effect' searches with windows of the patch sizes: give candidate_windows")
        if not 0.0 <= _real(self.extreme_fpr, "extreme_fpr") <= 1.0:
            raise ConfigError(f"extreme_fpr={self.extreme_fpr} must lie in [0, 1]")

    @property
    def layers(self) -> tuple[str, ...]:
        """All layers read by the defense, each once, S first."""
        return tuple(dict.fromkeys(self.shallow_layers + self.deep_layers))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dictionary (tuples become lists)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ZMaskConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error so that typos do not pass silently."""
        if not isinstance(data, Mapping):
            raise ZMaskTypeError(f"a configuration must be a mapping of setting names to values, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(map(str, set(data) - known))
        if unknown:
            raise ConfigError(f"unknown configuration keys {unknown}; known keys are {sorted(known)}")
        return cls(**data)

    def replace(self, **changes: Any) -> ZMaskConfig:
        return dataclasses.replace(self, **changes)

    def at_heatmap(self, heatmap_size: tuple[int, int]) -> ZMaskConfig:
        """This configuration on another heatmap grid, the SPR kernels keeping their fraction of it
        (:func:`scale_kernels`): the cost-aware fit's candidates (``FitPlan.max_overhead``)."""
        size = _as_pair(heatmap_size, "heatmap_size")
        if size == self.heatmap_size:
            return self
        return self.replace(heatmap_size=size, shallow_kernels=scale_kernels(self.shallow_kernels, self.heatmap_size, size),
                            deep_kernels=scale_kernels(self.deep_kernels, self.heatmap_size, size))

    @classmethod
    def for_segmentation(cls, shallow_layers, deep_layers, input_size: tuple[int, int], heatmap_size=None, **kwargs: Any) -> ZMaskConfig:
        """The paper's segmentation setting (150x300 heatmap for 1024x2048) scaled to ``input_size``.

        ``heatmap_size`` overrides the scaled heatmap; kernels always keep the paper's fraction of it.
        """
        return cls._scaled(shallow_layers, deep_layers, input_size, heatmap_size, (1024, 2048), PAPER_SEGMENTATION_HEATMAP,
                           PAPER_SEGMENTATION_SHALLOW_KERNELS, PAPER_SEGMENTATION_DEEP_KERNELS, kwargs)

    @classmethod
    def for_detection(cls, shallow_layers, deep_layers, input_size: tuple[int, int], heatmap_size=None, **kwargs: Any) -> ZMaskConfig:
        """The paper's COCO detection setting (400x500 heatmap for ~800x1000 inputs) scaled to ``input_size``."""
        return cls._scaled(shallow_layers, deep_layers, input_size, heatmap_size, (800, 1000), PAPER_DETECTION_HEATMAP,
                           PAPER_DETECTION_SHALLOW_KERNELS, PAPER_DETECTION_DEEP_KERNELS, kwargs)

    @classmethod
    def _scaled(cls, shallow, deep, input_size, heatmap, paper_input, paper_heatmap, s_kernels, d_kernels, kwargs):
        input_size = _as_pair(input_size, "input_size")
        if heatmap is None:
            ratio_h, ratio_w = paper_heatmap[0] / paper_input[0], paper_heatmap[1] / paper_input[1]
            heatmap = (max(8, round(input_size[0] * ratio_h)), max(8, round(input_size[1] * ratio_w)))
        return cls(
            shallow_layers=tuple(shallow),
            deep_layers=tuple(deep),
            shallow_kernels=scale_kernels(s_kernels, paper_heatmap, heatmap),
            deep_kernels=scale_kernels(d_kernels, paper_heatmap, heatmap),
            heatmap_size=heatmap,
            **kwargs,
        )


def _real(value: Any, name: str) -> float:
    """``value`` as a finite float; a string, bool, None or NaN/Inf is an error naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ZMaskTypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    if not math.isfinite(value):
        raise ConfigError(f"{name} must be finite, got {value!r}")
    return float(value)


def _integer(value: Any, name: str, low: int, high: int | None = None) -> int:
    """``value`` as an int in [low, high]; a float, bool or string is an error naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ZMaskTypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    number = int(value)
    if number < low or (high is not None and number > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ConfigError(f"{name}={value} must be {bound}")
    return number


def _as_pair(value: Any, name: str) -> tuple[int, int]:
    try:
        if isinstance(value, (str, bytes)):
            raise TypeError
        first, second = value
        if isinstance(first, bool) or isinstance(second, bool):
            raise TypeError
        pair = (int(first), int(second))
    except (TypeError, ValueError, OverflowError):
        raise ZMaskTypeError(f"{name}: expected a (height, width) pair of integers, got {value!r}") from None
    if pair != (first, second) or min(pair) < 1:
        raise ConfigError(f"{name}: expected positive integers, got {value!r}")
    return pair
