"""Implementations of the ``zmask`` subcommands (argument parsing lives in :mod:`zmask.cli`)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .cli import CommandError, write_run_record

PACKAGED_PATCHES = Path(__file__).parent / "patches"


def _print(args: argparse.Namespace, human: str, data: Any) -> None:
    print(json.dumps(data, default=str) if args.json else human)


def _load_patch_file(path: str) -> torch.Tensor:
    from .attacks import load_patch

    return load_patch(path)[0]


# ---------------------------------------------------------------- models / assets
def run_models(args: argparse.Namespace) -> int:
    from .models import PRESETS, get_preset

    if args.layers:
        preset = get_preset(args.layers)
        names = [name for name, _ in preset.build(False).named_modules() if name]
        _print(args, "\n".join(names), names)
        return 0
    rows = [{"name": p.name, "task": p.task, "input": list(p.input_size), "shallow": list(p.shallow_layers), "deep": list(p.deep_layers),
             "heatmap": list(p.heatmap_size), "weights": p.pretrained_source, "description": p.description} for p in PRESETS.values()]
    lines = [f"{r['name']:32s} {r['task']:13s} {r['input'][0]}x{r['input'][1]:<5d} S={','.join(r['shallow'])}  D={','.join(r['deep'])}" for r in rows]
    _print(args, "\n".join(lines), rows)
    return 0


def run_assets(args: argparse.Namespace) -> int:
    from .assets import download_asset, search_folders, status

    if args.download:
        path = download_asset(args.download)
        _print(args, f"downloaded {args.download} to {path}", {"name": args.download, "path": str(path)})
        return 0
    rows = status()
    lines = [f"looked in: {', '.join(str(f) for f in search_folders())}"]
    lines += [f"{r['state']:9s} {r['name']:28s} {r['path']}\n          source: {r['source']} ({r['licence']})" + (f"\n          {r['detail']}" if r['detail'] else "") for r in rows]
    _print(args, "\n".join(lines), rows)
    return 0


# ---------------------------------------------------------------- attack
def run_attack(args: argparse.Namespace) -> int:
    from .attacks import AttackConfig, patch_size, random_noise_patch, save_patch
    from .models import get_preset
    from .recipes import craft_patch

    preset = get_preset(args.model)
    size = patch_size(preset.task, args.size, preset.input_size)
    if args.noise:
        patch = random_noise_patch(size, args.seed)
        path = save_patch(patch, args.out, {"model": args.model, "kind": "random-noise", "size": args.size, "seed": args.seed})
        _print(args, f"wrote random-noise patch {path} ({size[0]}x{size[1]})", {"patch": str(path), "size": size})
        return 0
    config = AttackConfig(
        patch_size=size, steps=args.steps, batch_size=args.batch_size, learning_rate=args.lr, beta=args.beta, alpha=args.alpha,
        defense_attack=args.defense_attack, objective=args.objective, smoothness_weight=args.smoothness, seed=args.seed,
    )
    if (args.beta < 1.0 or args.defense_attack) and not args.profile:
        raise CommandError("beta < 1 and defense-aware attacks need --profile (a fitted Z-Mask profile from `zmask fit`)")
    initial = _load_patch_file(args.resume) if args.resume else None
    started = time.time()
    result, metadata = craft_patch(args.model, args.size, config, profile=args.profile, split=args.split, limit=args.limit,
                                   initial=initial, progress=not args.no_progress, data_root=args.data)
    metadata.update(seconds_per_step=(time.time() - started) / max(config.steps, 1), resumed_from=args.resume, command="zmask attack")
    path = save_patch(result.patch, args.out, metadata)
    _print(args, f"wrote {path} and {path.with_suffix('.json')} ({config.steps} steps, {metadata['seconds_per_step']:.2f} s/step)",
           {"patch": str(path), **metadata})
    return 0


# ---------------------------------------------------------------- fit
def run_fit(args: argparse.Namespace) -> int:
    from .core.fusion import FusionTraining
    from .data.cache import CachedDataset
    from .evaluation import FitPlan, fit_zmask
    from .models import get_preset
    from .recipes import default_dataset

    preset = get_preset(args.model)
    overrides = {}
    if args.shallow:
        overrides["shallow_layers"] = tuple(args.shallow)
    if args.deep:
        overrides["deep_layers"] = tuple(args.deep)
    config = preset.config(**overrides)
    model = preset.build(True)
    dataset = CachedDataset(default_dataset(preset, args.split, None, args.data))
    patches = [_load_patch_file(p) for p in args.patches]
    plan = FitPlan(args.statistics_images, args.fusion_images, args.calibration_images,
                   placements=args.placements, fusion=FusionTraining(epochs=args.epochs, batch_size=15, learning_rate=0.01, seed=args.seed, min_steps=300),
                   seed=args.seed)
    needed = plan.statistics_images + plan.fusion_images + plan.calibration_images
    if needed > len(dataset):
        raise CommandError(f"the {args.split} split has {len(dataset)} images, the plan needs {needed}: lower --statistics-images/--fusion-images/--calibration-images")
    defense, report = fit_zmask(model, config, dataset, patches, plan, progress=not args.no_progress)
    path = defense.save(args.out)
    write_run_record(Path(str(path) + ".run"), args, {"report": report})
    calibration = report["calibration"]
    _print(args, f"wrote profile {path}: lambda0 = {report['threshold']:.4f} (calibration AUC {calibration['auc']:.3f}, "
                 f"TPR {calibration['true_positive_rate']:.3f}, FPR {calibration['false_positive_rate']:.3f})", {"profile": str(path), **report})
    return 0


# ---------------------------------------------------------------- defend
def _input_images(inputs: list[str]) -> list[Path]:
    from .data.folder import IMAGE_SUFFIXES

    paths = []
    for entry in inputs:
        path = Path(entry)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise CommandError(f"no images in folder {path}")
            paths += found
        elif path.is_file():
            paths.append(path)
        else:
            raise CommandError(f"input {path} does not exist")
    return paths


def _to_png(tensor: torch.Tensor, path: Path) -> None:
    import numpy as np
    from PIL import Image

    array = (tensor.detach().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
    array = array[0] if array.shape[0] == 1 else array.permute(1, 2, 0)
    Image.fromarray(np.ascontiguousarray(array.numpy())).save(path)


def run_defend(args: argparse.Namespace) -> int:
    from .data import read_image
    from .defense import ZMask
    from .models import get_preset
    from .models.yolov5 import letterbox

    preset = get_preset(args.model)
    model = preset.build(True)
    defense = ZMask.load(args.profile, model)
    paths = _input_images(args.inputs)
    out = Path(args.out)
    for folder in ("masked", "masks", "heatmaps"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    write_run_record(out, args, {"profile": str(args.profile), "images": len(paths)})
    lines = []
    with open(out / "results.jsonl", "w") as results:
        for path in paths:
            image = read_image(path)
            note = None
            if preset.task == "detection":
                image, _ = letterbox(image, preset.input_size[0], auto=False)
                note = "letterboxed"
            elif tuple(image.shape[1:]) != tuple(preset.input_size):
                image = F.interpolate(image[None], size=preset.input_size, mode="bilinear", align_corners=False)[0].clamp(0, 1)
                note = f"resized to {preset.input_size[0]}x{preset.input_size[1]}"
            with torch.no_grad():
                result = defense(image[None], return_heatmaps=True)
            detection = result.detection
            keep = detection.keep_mask[0]
            stem = path.stem
            _to_png(defense.apply_mask(image[None], keep[None])[0], out / "masked" / f"{stem}.png")
            _to_png(1 - keep, out / "masks" / f"{stem}.png")
            shallow = result.heatmaps.shallow[0]
            _to_png(shallow / shallow.max().clamp(min=1e-9), out / "heatmaps" / f"{stem}_shallow.png")
            record = {"image": str(path), "score": float(detection.score[0]), "flagged": bool(detection.flagged[0]),
                      "masked_fraction": float(1 - keep.mean()), "threshold": defense.threshold, "preprocessing": note}
            results.write(json.dumps(record) + "\n")
            lines.append(record)
            if not args.json:
                print(f"{'PATCH' if record['flagged'] else 'clean':5s} score={record['score']:.4f} masked={record['masked_fraction']:.3f} {path}")
            else:
                print(json.dumps(record))
    if not args.json:
        print(f"{sum(r['flagged'] for r in lines)} of {len(lines)} images flagged; outputs in {out}")
    return 0


# ---------------------------------------------------------------- evaluate
def _named_patches(entries: list[str], flag: str) -> list[tuple[str, torch.Tensor]]:
    pairs = []
    for entry in entries:
        if "=" not in entry:
            raise CommandError(f"{flag} expects NAME=PNG, got {entry!r}")
        name, path = entry.split("=", 1)
        pairs.append((name, _load_patch_file(path)))
    return pairs


def run_evaluate(args: argparse.Namespace) -> int:
    from .attacks import patch_size, random_noise_patch
    from .data.cache import CachedDataset
    from .defense import ZMask
    from .evaluation import ExperimentSpec, build_defenses, run_experiments
    from .models import get_preset
    from .recipes import annotation_file, default_dataset, task_for

    preset = get_preset(args.model)
    model = preset.build(True)
    zmask = ZMask.load(args.profile, model)
    patches = dict(_named_patches(args.patch, "--patch"))
    if args.random_noise:
        patches = {"random L": random_noise_patch(patch_size(preset.task, "L", preset.input_size), args.seed), **patches}
    beta = {float(k): v for k, v in _named_patches(args.beta_patch, "--beta-patch")}
    alpha = {}
    for key, patch in _named_patches(args.alpha_patch, "--alpha-patch"):
        if ":" not in key:
            raise CommandError(f"--alpha-patch expects ATTACK:ALPHA=PNG, got {key!r}")
        attack, value = key.split(":", 1)
        alpha[(attack, float(value))] = patch
    dataset = CachedDataset(default_dataset(preset, args.split, args.limit, args.data))
    train = CachedDataset(default_dataset(preset, "train", args.train_images, args.data))
    adversarial = [p for name, p in patches.items() if not name.startswith("random")] + list(beta.values())
    masking, detectors = build_defenses(model, zmask, train, adversarial, args.defenses, args.seed, not args.no_progress)
    task = task_for(preset, model, annotation_file(preset, args.split, args.data))
    spec = ExperimentSpec(f"{args.model} on {args.split}", patches, beta, alpha, args.seed, args.batch_size)
    out = Path(args.out)
    write_run_record(out, args, {"profile": str(args.profile)})
    results = run_experiments(task, dataset, zmask, spec, masking, detectors, out, vars(args), progress=not args.no_progress)
    summary = (out / "summary.md").read_text()
    _print(args, summary + f"\nreport written to {out}", {"out": str(out), "results": results})
    return 0


# ---------------------------------------------------------------- bench / demo
def run_bench(args: argparse.Namespace) -> int:
    from .bench import run_benchmarks

    figures = run_benchmarks(args.model, repeats=args.repeats, quick=args.quick, progress=not args.no_progress)
    _print(args, "\n".join(f"{k}: {v}" for k, v in figures.items()), figures)
    return 0


def run_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo as demo

    summary = demo(Path(args.out), images=args.images, quick=args.quick, seed=args.seed, progress=not args.no_progress, args=args)
    _print(args, summary["text"], summary)
    return 0
