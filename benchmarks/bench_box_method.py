"""Which SPR evaluator is faster for each layer of the presets, and which one "auto" picks.

For every layer of the shipped presets' profiles (and the paper's ResNet-50 setting) it times the
summed-area-table and the separable evaluators on the same random activation (medians of
interleaved runs), prints the "auto" choice beside them, and the break-even matrix-product
advantage of the layer's cost model (above it "auto" picks separable). The last line gives the
range of ``MATMUL_ADVANTAGE`` (``zmask.core.refinement``) for which every choice is right on this
machine: that is where the constant comes from.

Run: python benchmarks/bench_box_method.py [--threads 1] [--repeats 5]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from zmask import ZMaskConfig
from zmask.config import PAPER_SEGMENTATION_DEEP_KERNELS, PAPER_SEGMENTATION_SHALLOW_KERNELS
from zmask.core.refinement import MATMUL_ADVANTAGE, LayerRefiner, build_plan, layer_cost
from zmask.core.statistics import LayerStatistics

ESPNET = ((38, 51), (19, 26), (10, 13), (5, 6))
CGNET = ((19, 26), (10, 13), (5, 6), (2, 3))
EDGENETS = ((55, 109), (27, 55), (14, 27), (7, 14))
YOLO = ((8, 6), (5, 4), (2, 2), (16, 13))
CASES = [
    # name, native size, heatmap size, kernels, pooling, channels: the shipped profiles' layers
    ("espnet b1", (180, 240), (90, 120), ESPNET, "same", 19),
    ("espnet b2", (90, 120), (90, 120), ESPNET, "same", 131),
    ("espnet level3_0", (45, 60), (90, 120), ESPNET, "same", 128),
    ("espnet b3", (45, 60), (90, 120), ESPNET[:2], "same", 256),
    ("espnetv2 1/4", (128, 256), (128, 256), EDGENETS, "same", 96),
    ("dicenet 1/8", (64, 128), (128, 256), EDGENETS, "same", 64),
    ("cgnet b1", (180, 240), (45, 60), CGNET, "same", 35),
    ("cgnet bn_prelu_2", (90, 120), (45, 60), CGNET, "same", 131),
    ("cgnet level3_0", (45, 60), (45, 60), CGNET, "same", 128),
    ("cgnet bn_prelu_3", (45, 60), (45, 60), CGNET[:2], "same", 256),
    ("yolov5n model.1", (160, 160), (80, 80), YOLO, "same", 32),
    ("yolov5n model.3", (80, 80), (80, 80), YOLO[3:] + YOLO[:1], "same", 64),
    ("nanodet stage2", (40, 40), (20, 20), ((2, 2), (1, 1), (4, 3)), "same", 116),
    ("fastestdet stage2", (44, 44), (22, 22), ((2, 2), (1, 1), (4, 4)), "same", 48),
    # the paper's ResNet-50 setting (1/2 .. 1/32 of 512x1024, a 150x300 grid)
    ("resnet50 conv1", (256, 512), (150, 300), PAPER_SEGMENTATION_SHALLOW_KERNELS, "valid_stretch", 64),
    ("resnet50 layer1", (128, 256), (150, 300), PAPER_SEGMENTATION_SHALLOW_KERNELS, "valid_stretch", 64),
    ("resnet50 layer4", (16, 32), (150, 300), PAPER_SEGMENTATION_DEEP_KERNELS, "valid_stretch", 256),
]


def config_for(grid, kernels, pooling, method: str) -> ZMaskConfig:
    return ZMaskConfig(shallow_layers=("a",), deep_layers=("a",), shallow_kernels=tuple(kernels), deep_kernels=tuple(kernels[:1]),
                       heatmap_size=grid, pooling=pooling, box_method=method, spr_variant="reference")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {args.threads} thread(s), medians of {args.repeats} interleaved runs")
    print(f"{'layer':18s} {'channels x native -> grid':28s} {'table ms':>9s} {'separable ms':>13s} {'auto picks':>11s}  right?  break-even")
    wrong, lowest, highest = 0, 0.0, math.inf
    for name, native, grid, kernels, pooling, channels in CASES:
        activation = torch.randn(1, channels, *native)
        stats = LayerStatistics(torch.zeros(channels, 1), torch.ones(channels, 1))
        refiners = {method: LayerRefiner(config_for(grid, kernels, pooling, method)) for method in ("table", "separable")}
        times: dict[str, list[float]] = {method: [] for method in refiners}
        for _ in range(args.repeats + 1):
            for method, refiner in refiners.items():
                start = time.perf_counter()
                refiner.heatmaps(activation, stats, {"S": kernels})
                times[method].append(time.perf_counter() - start)
        table, separable = (statistics.median(times[m][1:]) * 1e3 for m in ("table", "separable"))
        auto = config_for(grid, kernels, pooling, "auto")
        picked = build_plan(native, auto, kernels, torch.device("cpu")).method
        faster = "table" if table <= separable else "separable"
        right = picked == faster
        wrong += not right
        break_even = layer_cost(native, auto, kernels).break_even()
        if faster == "separable":
            lowest = max(lowest, break_even)
        else:
            highest = min(highest, break_even)
        shape = f"{channels} x {native[0]}x{native[1]} -> {grid[0]}x{grid[1]}"
        print(f"{name:18s} {shape:28s} {table:9.1f} {separable:13.1f} {picked:>11s}  {'yes' if right else 'NO':6s}  {break_even:10.1f}")
    print(f"auto (MATMUL_ADVANTAGE {MATMUL_ADVANTAGE:g}) picked the slower evaluator for {wrong} of {len(CASES)} layers")
    verdict = "" if lowest < highest else " (empty: no single constant is right for every layer here)"
    print(f"advantages for which every pick is right on this machine: {lowest:.1f} to {highest:.1f}{verdict}")


if __name__ == "__main__":
    main()
