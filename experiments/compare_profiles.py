"""Training-split evidence for choosing between fitted profiles of one preset (no evaluation data).

For each profile, on the calibration share of the training split (the images the fit used only to
choose lambda0, re-drawn with fresh seeded placements and no EOT): the clean flag rate, the flag
rate under a random-noise patch of the L size (an occluder, not an attack), and the flag rate
(TPR) under each given patch.

Run from the repository root, e.g.:
    python experiments/compare_profiles.py --fit-config experiments/yolov5n_coco_fit.yaml \
        --profiles src/zmask/profiles/yolov5n_coco.safetensors other.safetensors --patch L=src/zmask/patches/yolov5n_coco_L.png
"""

from __future__ import annotations

import argparse
import json

import torch
import yaml

from zmask import ZMask
from zmask.attacks import load_patch, random_noise_patch
from zmask.data.cache import CachedDataset
from zmask.evaluation import FitPlan, PatchSetting, ZMaskDefense, evaluate, training_shares
from zmask.models import get_preset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fit-config", required=True, help="the fit's YAML (model, statistics/fusion/calibration image counts)")
    parser.add_argument("--profiles", nargs="+", required=True)
    parser.add_argument("--patch", action="append", default=[], metavar="NAME=PNG")
    parser.add_argument("--seed", type=int, default=10, help="placement seed (not the fit's)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    fit = yaml.safe_load(open(args.fit_config))
    preset = get_preset(fit["model"])
    plan = FitPlan(fit.get("statistics_images", 120), fit.get("fusion_images", 120), fit.get("calibration_images", 80))
    dataset = CachedDataset(preset.dataset(preset.train_split, None))
    _, _, calibration = training_shares(dataset, plan)
    model = preset.build(True)
    settings = [PatchSetting("clean"), PatchSetting("random-noise L", random_noise_patch(preset.patch_size("L"), args.seed))]
    settings += [PatchSetting(name, load_patch(path)[0]) for name, path in (entry.split("=", 1) for entry in args.patch)]
    table = {}
    for path in args.profiles:
        defense = ZMaskDefense(ZMask.load(path, model))
        results, _ = evaluate(preset.task_for(model, preset.train_split), calibration, settings, [defense], seed=args.seed, progress=False)
        table[path] = {name: round(row[defense.name].summary()["flag_rate"], 3) for name, row in results.items()}
    print(f"flag rates on the {len(calibration)} calibration images of {preset.train_split} (placement seed {args.seed})")
    print(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
