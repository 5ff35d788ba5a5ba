"""Performance figures for ``zmask bench``: what the defense costs per frame, as ratios to the
model's own forward pass, measured in one run.

The compared functions run interleaved (forward, defended clean frame, flagged frame, one after
the other, ``repeats`` times) and each keeps its median, so that all of them see the same machine
load. The literal reference implementation (one ``avg_pool2d`` per kernel on the resized Z-score,
as the paper describes SPR) runs once per thread count: it is slow.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..core.analysis import kernel_sets
from ..core.boxfilter import box_filter
from ..core.fusion import fuse_and_score
from ..core.refinement import layer_heatmap_direct
from ..defense import ZMask
from ..errors import ConfigError
from ..evaluation.cost import interleaved_medians, never_flag
from ..models import get_preset


def _literal_analysis(defense: ZMask, images: torch.Tensor) -> torch.Tensor:
    """The whole analysis the slow, literal way: direct SPR per layer, max per set, fusion, score."""
    _, activations = defense.capture(images)
    config, stats = defense.config, defense.state.statistics
    assert stats is not None, "fit the statistics first"
    maps = {name: {key: layer_heatmap_direct(activations[name], stats[name], kernels, config)
                   for key, kernels in kernel_sets(config, name).items()} for name in config.layers}
    shallow = torch.stack([maps[n]["S"] for n in config.shallow_layers]).amax(0).float()
    deep = torch.stack([maps[n]["D"] for n in config.deep_layers]).amax(0).float()
    return fuse_and_score(defense.state.fusion, shallow, deep, config.score)[1]


def _shipped_config(preset: Any) -> Any:
    """The configuration of the preset's shipped profile (its grid and layers are what users run),
    or the preset's own when it has none."""
    if preset.profile_record is None:
        return preset.config()
    from ..core.profile import load_profile

    return load_profile(preset.profile()).config


def run_benchmarks(preset_name: str = "espnet_camvid", repeats: int = 9, quick: bool = False, progress: bool = False,
                   threads: Sequence[int] = (1, 2), batch_sizes: Sequence[int] = (1, 8), literal: bool = True,
                   profile: str | Path | None = None) -> dict[str, Any]:
    """Per-frame costs of the defended model at each thread count: forward, defended clean frame
    (analysis, no second pass), flagged frame (analysis + masked second pass), the literal reference
    analysis, and images per second of defended clean frames for each batch size.

    ``profile``: a fitted profile of the preset's model, loaded whole (its layers, grid, fusion
    block, and whatever it enables, e.g. mask candidates on flagged frames). Without one the
    configuration of the preset's shipped profile runs with statistics of the timed frame.
    """
    preset = get_preset(preset_name)
    input_size = preset.input_size
    try:
        model = preset.build(True)
        weights = "pretrained"
    except Exception:  # noqa: BLE001 - timing does not need trained weights
        model = preset.build(False)
        weights = "random (assets not found)"
    if profile is not None:
        if quick:
            raise ConfigError("--quick shrinks the configuration; it cannot be combined with --profile")
        defense = ZMask.load(profile, model, allow_other_weights=weights != "pretrained")
        config = defense.config
        input_size = defense.state.input_size or input_size
    else:
        config = _shipped_config(preset)
        if quick:
            config = config.replace(heatmap_size=(32, 48), shallow_kernels=((8, 12), (4, 6)), deep_kernels=((8, 12),),
                                    mask_dilation=min(config.mask_dilation, 2))
            input_size = (64, 96)
        defense = ZMask(model, config, seed=0)
    generator = torch.Generator().manual_seed(1)
    frames = torch.rand(max(batch_sizes), 3, *input_size, generator=generator)
    image = frames[:1]
    state = defense.state
    previous_threads = torch.get_num_threads()
    figures: dict[str, Any] = {"model": preset_name, "weights": weights, "input": list(input_size), "heatmap": list(config.heatmap_size),
                               "profile": str(profile) if profile is not None else None, "repeats": repeats, "per_threads": {}}
    try:
        with torch.no_grad():
            if profile is None:
                defense.fit_statistics([image])
            height, width = config.heatmap_size
            grid = torch.randn(1, 64, height, width, generator=torch.Generator().manual_seed(0))
            for count in threads:
                torch.set_num_threads(count)
                table_time, pool_time = interleaved_medians(
                    [lambda: box_filter(grid, config.shallow_kernels),
                     lambda: [torch.nn.functional.avg_pool2d(grid, k, stride=1) for k in config.shallow_kernels]], max(1, repeats // 3))

                def clean() -> Any:
                    never_flag(state)  # analysis only
                    return defense(image)

                def flagged() -> Any:
                    state.threshold = -float("inf")  # always flagged: analysis + masked second pass(es)
                    return defense(image)

                forward_time, clean_time, flagged_time = interleaved_medians([lambda: model(image), clean, flagged], repeats)
                row = {
                    "forward_ms": forward_time * 1e3, "defended_clean_ms": clean_time * 1e3, "defended_flagged_ms": flagged_time * 1e3,
                    "clean_over_forward": clean_time / forward_time, "flagged_over_forward": flagged_time / forward_time,
                    "box_filter_speedup_64ch": pool_time / table_time,
                }
                if literal:
                    start = time.perf_counter()
                    _literal_analysis(defense, image)
                    literal_time = time.perf_counter() - start
                    row.update(literal_clean_ms=(literal_time + forward_time) * 1e3, literal_over_forward=(literal_time + forward_time) / forward_time,
                               speedup_over_literal=(literal_time + forward_time) / clean_time)
                never_flag(state)
                for batch in batch_sizes:
                    (batch_time,) = interleaved_medians([lambda: defense(frames[:batch])], max(1, repeats // 3))
                    row[f"images_per_second_batch{batch}"] = batch / batch_time
                figures["per_threads"][str(count)] = {k: round(v, 3) for k, v in row.items()}
    finally:
        torch.set_num_threads(previous_threads)
    return figures


def format_benchmarks(figures: dict[str, Any]) -> str:
    """A table of the figures, one column per thread count."""
    columns = list(figures["per_threads"])
    rows = [
        ("forward (ms)", "forward_ms"), ("defended clean frame (ms)", "defended_clean_ms"), ("flagged frame (ms)", "defended_flagged_ms"),
        ("defended clean / forward", "clean_over_forward"), ("flagged / forward", "flagged_over_forward"),
        ("literal reference / forward", "literal_over_forward"), ("speed-up over the literal reference", "speedup_over_literal"),
        ("images/s, batch 1 (defended clean)", "images_per_second_batch1"), ("images/s, batch 8 (defended clean)", "images_per_second_batch8"),
        ("box filter vs avg_pool2d, 64 channels", "box_filter_speedup_64ch"),
    ]
    source = f", profile {figures['profile']}" if figures.get("profile") else ""
    lines = [f"zmask bench: {figures['model']} ({figures['weights']} weights{source}), input {figures['input'][0]}x{figures['input'][1]}, "
             f"heatmap {figures['heatmap'][0]}x{figures['heatmap'][1]}, medians of {figures['repeats']} interleaved runs",
             f"{'':40s}" + "".join(f"{c + ' thread' + ('s' if c != '1' else ''):>14s}" for c in columns)]
    for label, key in rows:
        values = [figures["per_threads"][c].get(key) for c in columns]
        if all(v is None for v in values):
            continue
        lines.append(f"{label:40s}" + "".join(f"{v:14.2f}" if v is not None else f"{'-':>14s}" for v in values))
    return "\n".join(lines)
