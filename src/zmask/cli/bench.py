"""Performance figures for ``zmask bench``: SPR speed-up, defense overhead, images per second.

Timings alternate between the compared functions and keep each one's best, so that both see the
same machine load; every figure is measured in the same run.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F

from ..core.boxfilter import box_filter
from ..defense import ZMask
from ..models import get_preset


def _interleaved_best(functions, repeats: int) -> list[float]:
    best = [float("inf")] * len(functions)
    for _ in range(repeats):
        for index, function in enumerate(functions):
            start = time.perf_counter()
            function()
            best[index] = min(best[index], time.perf_counter() - start)
    return best


def run_benchmarks(preset_name: str = "espnet_camvid", repeats: int = 5, quick: bool = False, progress: bool = False) -> dict[str, Any]:
    preset = get_preset(preset_name)
    config = preset.config()
    if quick:
        config = config.replace(heatmap_size=(32, 48), shallow_kernels=((8, 12), (4, 6)), deep_kernels=((8, 12),))
    height, width = config.heatmap_size
    grid = torch.randn(1, 64, height, width, generator=torch.Generator().manual_seed(0))
    table_time, direct_time = _interleaved_best(
        [lambda: box_filter(grid, config.shallow_kernels), lambda: [F.avg_pool2d(grid, k, stride=1) for k in config.shallow_kernels]], repeats)
    try:
        model = preset.build(True)
        weights = "pretrained"
    except Exception:  # noqa: BLE001 - timing does not need trained weights
        model = preset.build(False)
        weights = "random (assets not found)"
    input_size = (64, 64) if quick else preset.input_size
    images = torch.rand(1, 3, *input_size, generator=torch.Generator().manual_seed(1))
    defense = ZMask(model, config, seed=0)
    with torch.no_grad():
        defense.fit_statistics([images])
        defense.threshold = float("inf")  # clean frames: analysis only, no second pass
        forward_time, defended_time = _interleaved_best([lambda: model(images), lambda: defense(images)], repeats)
        defense.threshold = -float("inf")  # every frame flagged: analysis + masked second pass
        (attacked_time,) = _interleaved_best([lambda: defense(images)], max(1, repeats // 2))
    return {
        "model": preset_name, "weights": weights, "threads": torch.get_num_threads(), "input": list(input_size),
        "heatmap": [height, width], "kernels": [list(k) for k in config.shallow_kernels],
        "box_filter_ms_64ch": round(table_time * 1e3, 2), "avg_pool2d_ms_64ch": round(direct_time * 1e3, 2),
        "spr_speedup": round(direct_time / table_time, 1),
        "forward_ms": round(forward_time * 1e3, 2), "defended_clean_ms": round(defended_time * 1e3, 2),
        "defense_overhead_clean": round(defended_time / forward_time - 1, 3),
        "defended_flagged_ms": round(attacked_time * 1e3, 2),
        "images_per_second_clean": round(1 / defended_time, 2), "images_per_second_flagged": round(1 / attacked_time, 2),
    }


def format_benchmarks(figures: dict[str, Any]) -> str:
    """The figures as ``name: value`` lines."""
    return "\n".join(f"{name}: {value}" for name, value in figures.items())
