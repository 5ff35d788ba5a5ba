"""Benchmark of the Z-Mask analysis (issue 2): prints measured figures side by side in one run.

(a) box filter of one 128-channel layer at 150x300 with the paper's segmentation kernels:
    summed-area table vs direct ``avg_pool2d``;
(b) the paper's detector configuration on a torchvision ResNet-50 body (random weights) at
    512x1024 with a 150x300 heatmap: the whole analysis vs the body's own forward, and vs the
    direct implementation (every channel resized, pooled, resized back), outputs compared;
(c) peak memory of the analysis beside that of the forward (torch profiler memory records).

Run: python benchmarks/bench_refinement.py [--threads 2] [--skip-direct]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torchvision.models import resnet50
from torchvision.models._utils import IntermediateLayerGetter

from zmask import FittedState, FusionBlock, ZMask, ZMaskConfig, detection_score
from zmask.config import PAPER_SEGMENTATION_DEEP_KERNELS, PAPER_SEGMENTATION_SHALLOW_KERNELS
from zmask.core.boxfilter import box_filter
from zmask.core.refinement import layer_heatmap_direct
from zmask.core.statistics import LayerStatistics


def best_time(function, repeats: int) -> float:
    """Smallest wall time over ``repeats`` calls (the least disturbed by other load)."""
    return min(interleaved_times([function], repeats)[0])


def interleaved_times(functions, repeats: int) -> list[list[float]]:
    """Wall times of several functions measured alternately, so that all see the same machine load."""
    times: list[list[float]] = [[] for _ in functions]
    for _ in range(repeats):
        for function, record in zip(functions, times):
            start = time.perf_counter()
            function()
            record.append(time.perf_counter() - start)
    return times


def peak_memory(function) -> float:
    """Peak of live CPU tensor memory (MiB) allocated while ``function`` runs, at operator granularity.

    The profiler attributes each allocation to the operator that made it and reports frees as
    negative entries; their running sum in time order is the memory held by tensors created inside
    ``function`` (transient peaks inside a single operator are not resolved).
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = function()
    del result
    current = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        current += event.self_cpu_memory_usage
        peak = max(peak, current)
    return peak / 2**20


def part_a(repeats: int) -> None:
    kernels = PAPER_SEGMENTATION_SHALLOW_KERNELS
    grid = torch.randn(1, 128, 150, 300, generator=torch.Generator().manual_seed(0))

    def fast():
        return box_filter(grid, kernels)

    def direct():
        return [F.avg_pool2d(grid, k, stride=1) for k in kernels]

    exact = [F.avg_pool2d(grid.double(), k, stride=1) for k in kernels]
    error_fast = max(float((a.double() - e).abs().max() / e.abs().max()) for a, e in zip(fast(), exact))
    error_direct = max(float((a.double() - e).abs().max() / e.abs().max()) for a, e in zip(direct(), exact))
    t_fast, t_direct = best_time(fast, repeats), best_time(direct, max(1, repeats // 2))
    print("(a) box filter, one layer of 128 channels at 150x300, kernels", list(kernels), "(one shared table)")
    print(f"    summed-area table : {t_fast * 1e3:9.1f} ms   max rel. error vs float64 avg_pool2d {error_fast:.1e}")
    print(f"    direct avg_pool2d : {t_direct * 1e3:9.1f} ms   max rel. error vs float64 avg_pool2d {error_direct:.1e}")
    print(f"    speed-up          : {t_direct / t_fast:9.1f} x")


def part_b(repeats: int, skip_direct: bool) -> None:
    torch.manual_seed(0)
    body = IntermediateLayerGetter(resnet50(), {"layer4": "out"}).eval()
    config = ZMaskConfig(
        shallow_layers=("conv1", "relu", "layer1.0.conv1"),
        deep_layers=("conv1", "layer4", "layer1.0.conv1"),
        shallow_kernels=PAPER_SEGMENTATION_SHALLOW_KERNELS,
        deep_kernels=PAPER_SEGMENTATION_DEEP_KERNELS,
        heatmap_size=(150, 300),
    )
    image = torch.rand(1, 3, 512, 1024, generator=torch.Generator().manual_seed(1))
    defense = ZMask(body, config, FittedState(fusion=FusionBlock(torch.Generator().manual_seed(0))))
    with torch.no_grad():
        defense.fit_statistics([image])
        _, activations = defense.capture(image)

        def forward():
            return body(image)

        def analysis():
            return defense.analyze(activations, (image.shape[-2], image.shape[-1]), gate=False)  # heatmaps, fusion, score

        forward_times, analysis_times = interleaved_times([forward, analysis], repeats)
        t_forward, t_analysis = min(forward_times), min(analysis_times)
        maps, _ = analysis()
        print("(b) ResNet-50 body (random weights), input 512x1024, heatmap 150x300")
        print("    S = conv1, relu, layer1.0.conv1 x 4 kernels; D = conv1, layer4, layer1.0.conv1 x 2 kernels")
        for name in config.layers:
            print(f"    {name:15s} {tuple(activations[name].shape[1:])} -> {defense._refiner.plan(tuple(activations[name].shape[-2:]), [(64, 128)], image.device).method}")
        print(f"    body forward      : {t_forward * 1e3:9.1f} ms")
        print(f"    Z-Mask analysis   : {t_analysis * 1e3:9.1f} ms   ({t_analysis / t_forward:.3f} of the forward)")
        if not skip_direct:
            start = time.perf_counter()
            direct = {
                "S": torch.stack([layer_heatmap_direct(activations[n], defense.statistics[n], config.shallow_kernels, config) for n in config.shallow_layers]).amax(0),
                "D": torch.stack([layer_heatmap_direct(activations[n], defense.statistics[n], config.deep_kernels, config) for n in config.deep_layers]).amax(0),
            }
            soft = defense.state.fusion(direct["S"], direct["D"])
            detection_score(direct["S"], direct["D"], soft)
            t_direct = time.perf_counter() - start
            error = max(
                float((maps.shallow - direct["S"]).abs().max() / direct["S"].abs().max()),
                float((maps.deep - direct["D"]).abs().max() / direct["D"].abs().max()),
            )
            print(f"    direct analysis   : {t_direct * 1e3:9.1f} ms   (speed-up {t_direct / t_analysis:.0f} x)")
            print(f"    max rel. difference fast vs direct (H_S, H_D): {error:.1e}")
        print("(c) peak memory of tensors allocated while running (op granularity)")
        print(f"    body forward      : {peak_memory(forward):9.1f} MiB")
        print(f"    Z-Mask analysis   : {peak_memory(analysis):9.1f} MiB   (chunks of at most {config.chunk_elements} grid values)")
        print(f"    + workspace held  : {defense._refiner.workspace.nbytes / 2**20:9.1f} MiB   (reused buffers, kept between calls)")
        print(f"    activations held  : {sum(a.numel() * a.element_size() for a in activations.values()) / 2**20:9.1f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--skip-direct", action="store_true", help="skip the slow direct implementation in (b)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads")
    part_a(args.repeats)
    part_b(args.repeats, args.skip_direct)


if __name__ == "__main__":
    main()
