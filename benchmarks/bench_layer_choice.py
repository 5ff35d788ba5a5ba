"""What each profile's layer choice costs per frame: the defended clean frame (forward + analysis,
no second pass) as a ratio to the model's own forward, for several profiles of one preset measured
interleaved in one run, so that every profile sees the same machine load.

Run (from the repository root, with ZMASK_ASSETS set):
    python benchmarks/bench_layer_choice.py --model espnet_camvid \
        --profiles src/zmask/profiles/espnet_camvid.safetensors docs/results/layer_selection/espnet_camvid_auto.safetensors
"""

from __future__ import annotations

import argparse

import torch

from zmask.evaluation.cost import interleaved_medians
from zmask.defense import ZMask
from zmask.models import get_preset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="espnet_camvid")
    parser.add_argument("--profiles", nargs="+", required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    preset = get_preset(args.model)
    model = preset.build(True).eval()
    image, _ = preset.prepare_image(preset.dataset("val", limit=1)[0]["image"])
    images = image[None]
    defenses = [ZMask.load(path, model) for path in args.profiles]
    with torch.no_grad():
        flagged = [bool(defense.detect(images).flagged[0]) for defense in defenses]
        medians = interleaved_medians([lambda: model(images)] + [lambda d=d: d(images) for d in defenses], args.repeats)
    forward = medians[0]
    print(f"{args.model}, {tuple(images.shape[-2:])} input, {args.threads} thread(s), medians of {args.repeats} interleaved runs")
    print(f"forward: {1e3 * forward:.1f} ms")
    print("| profile | S | D | defended clean frame (ms) | / forward | flagged |")
    print("|---|---|---|---|---|---|")
    for path, defense, seconds, flag in zip(args.profiles, defenses, medians[1:], flagged):
        config = defense.config
        print(f"| {path} | {', '.join(config.shallow_layers)} | {', '.join(config.deep_layers)} | {1e3 * seconds:.1f} | "
              f"{seconds / forward:.2f} | {flag} |")


if __name__ == "__main__":
    main()
