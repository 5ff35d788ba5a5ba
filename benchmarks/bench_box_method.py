"""Which SPR evaluator is faster for each layer of the presets, and which one "auto" picks.

For every (layer shape, heatmap, kernels) of the ESPNet, YOLOv5n and ResNet-50 configurations it
times the summed-area-table and the separable evaluators on the same random activation (medians
of interleaved runs) and prints the "auto" choice beside them; "auto" is right when it picks the
faster one. This is the measurement ``_MATMUL_ADVANTAGE`` in ``zmask.core.refinement`` comes from.

Run: python benchmarks/bench_box_method.py [--threads 1] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from zmask import ZMaskConfig
from zmask.config import PAPER_SEGMENTATION_DEEP_KERNELS, PAPER_SEGMENTATION_SHALLOW_KERNELS
from zmask.core.refinement import LayerRefiner, build_plan
from zmask.core.statistics import LayerStatistics

ESPNET_KERNELS = ((38, 51), (19, 26), (10, 13), (5, 6))
YOLO_KERNELS = ((32, 26), (20, 16), (8, 6), (64, 51))
CASES = [
    # name, native size, heatmap size, kernels, pooling, channels
    ("espnet b1", (180, 240), (90, 120), ESPNET_KERNELS, "same", 19),
    ("espnet b2", (90, 120), (90, 120), ESPNET_KERNELS, "same", 131),
    ("espnet level3_0", (45, 60), (90, 120), ESPNET_KERNELS, "same", 128),
    ("espnet b3", (45, 60), (90, 120), ESPNET_KERNELS[:2], "same", 256),
    ("yolov5n model.1", (160, 160), (320, 320), YOLO_KERNELS, "same", 16),
    ("yolov5n model.3", (80, 80), (320, 320), YOLO_KERNELS[:2], "same", 64),
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
    print(f"{'layer':16s} {'channels x native -> grid':28s} {'table ms':>9s} {'separable ms':>13s} {'auto picks':>11s}  right?")
    wrong = 0
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
        picked = build_plan(native, config_for(grid, kernels, pooling, "auto"), kernels, torch.device("cpu")).method
        right = picked == ("table" if table <= separable else "separable")
        wrong += not right
        shape = f"{channels} x {native[0]}x{native[1]} -> {grid[0]}x{grid[1]}"
        print(f"{name:16s} {shape:28s} {table:9.1f} {separable:13.1f} {picked:>11s}  {'yes' if right else 'NO'}")
    print(f"auto picked the slower evaluator for {wrong} of {len(CASES)} layers")


if __name__ == "__main__":
    main()
