"""Implementations of the ``zmask`` subcommands (argument parsing lives in :mod:`zmask.cli.parser`)."""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ..errors import UsageError
from .parser import VIDEO_SUFFIXES
from .records import write_run_record


def _print(args: argparse.Namespace, human: str, data: Any) -> None:
    print(json.dumps(data, default=str) if args.json else human)


def _load_patch_file(path: str) -> torch.Tensor:
    from ..attacks import load_patch

    return load_patch(path)[0]


# ---------------------------------------------------------------- models / assets
def run_models(args: argparse.Namespace) -> int:
    from ..models import PRESETS, get_preset

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
    from ..assets import download_asset, search_folders, status

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
def craft_patch(preset_name: str, size: str, config, profile: str | None = None, split: str = "train", limit: int | None = None,
                initial: torch.Tensor | None = None, progress: bool = True, data_root=None) -> tuple[Any, dict[str, Any]]:
    """Craft a patch for a preset on its training split; returns the result and sidecar metadata.

    ``profile``: a fitted Z-Mask profile, needed for activation-aware (beta < 1) and defense-aware attacks.
    """
    from ..attacks import PatchAttack
    from ..data.cache import CachedDataset
    from ..defense import ZMask
    from ..models import get_preset

    preset = get_preset(preset_name)
    model = preset.build(True)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    defense = ZMask.load(profile, model) if profile is not None else None
    config = replace(config, patch_size=preset.patch_size(size))
    data = CachedDataset(preset.dataset(split, limit, data_root))
    attack = PatchAttack(preset.task_for(model, split, data_root), config, defense)
    result = attack.run(data, initial=initial, progress=progress)
    final = {k: sum(h[k] for h in result.history[-10:]) / len(result.history[-10:]) for k in result.history[-1]} if result.history else {}
    metadata = {
        "model": preset_name, "task": preset.task, "size": size, "split": split, "images": len(data), "loss": config.objective,
        "beta": config.beta, "alpha": config.alpha, "profile": str(profile) if profile else None, "defense_attack": config.defense_attack, "seed": config.seed,
        "attack": config.to_dict(), "final_loss_terms_last10": final,
    }
    return result, metadata


def run_attack(args: argparse.Namespace) -> int:
    from ..attacks import AttackConfig, random_noise_patch, save_patch
    from ..models import get_preset

    preset = get_preset(args.model)
    size = preset.patch_size(args.size)
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
        raise UsageError("beta < 1 and defense-aware attacks need --profile (a fitted Z-Mask profile from `zmask fit`)")
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
    from ..core.fusion import FusionTraining
    from ..data.cache import CachedDataset
    from ..evaluation import FitPlan, fit_zmask
    from ..models import get_preset

    preset = get_preset(args.model)
    overrides = {}
    if args.shallow:
        overrides["shallow_layers"] = tuple(args.shallow)
    if args.deep:
        overrides["deep_layers"] = tuple(args.deep)
    config = preset.config(**overrides)
    model = preset.build(True)
    dataset = CachedDataset(preset.dataset(args.split, None, args.data))
    patches = [_load_patch_file(p) for p in args.patches]
    plan = FitPlan(args.statistics_images, args.fusion_images, args.calibration_images,
                   placements=args.placements, fusion=FusionTraining(epochs=args.epochs, batch_size=15, learning_rate=0.01, seed=args.seed, min_steps=300),
                   seed=args.seed)
    needed = plan.statistics_images + plan.fusion_images + plan.calibration_images
    if needed > len(dataset):
        raise UsageError(f"the {args.split} split has {len(dataset)} images, the plan needs {needed}: lower --statistics-images/--fusion-images/--calibration-images")
    defense, report = fit_zmask(model, config, dataset, patches, plan, progress=not args.no_progress)
    path = defense.save(args.out)
    write_run_record(Path(str(path) + ".run"), args, {"report": report})
    calibration = report["calibration"]
    _print(args, f"wrote profile {path}: lambda0 = {report['threshold']:.4f} (calibration AUC {calibration['auc']:.3f}, "
                 f"TPR {calibration['true_positive_rate']:.3f}, FPR {calibration['false_positive_rate']:.3f})", {"profile": str(path), **report})
    return 0


# ---------------------------------------------------------------- defend
def _split_inputs(inputs: list[str], frames: bool) -> tuple[list[Path], list[Path]]:
    """(image files, video sources): folders expand to their images, or with ``frames`` are one
    video each (frames in name order); files with a video suffix are videos."""
    from ..data.folder import IMAGE_SUFFIXES

    images, videos = [], []
    for entry in inputs:
        path = Path(entry)
        if path.is_dir():
            if frames:
                videos.append(path)
                continue
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise UsageError(f"no images in folder {path}")
            images += found
        elif path.is_file():
            (videos if path.suffix.lower() in VIDEO_SUFFIXES else images).append(path)
        else:
            raise UsageError(f"input {path} does not exist")
    return images, videos


def _to_png(tensor: torch.Tensor, path: Path) -> None:
    import numpy as np
    from PIL import Image

    array = (tensor.detach().cpu().float().clamp(0, 1) * 255).round().to(torch.uint8)
    array = array[0] if array.shape[0] == 1 else array.permute(1, 2, 0)
    Image.fromarray(np.ascontiguousarray(array.numpy())).save(path)


def run_defend(args: argparse.Namespace) -> int:
    from ..data import read_image
    from ..defense import ZMask
    from ..models import get_preset

    preset = get_preset(args.model)
    model = preset.build(True)
    defense = ZMask.load(args.profile, model)
    images, videos = _split_inputs(args.inputs, args.frames)
    out = Path(args.out)
    for folder in ("masked", "masks", "heatmaps"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    write_run_record(out, args, {"profile": str(args.profile), "images": len(images), "videos": [str(v) for v in videos]})
    lines = []
    with open(out / "results.jsonl", "w") as results:
        for path in images:
            image, note = preset.prepare_image(read_image(path))
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
    for source in videos:
        summary = _defend_video(args, preset, defense, source, out / "videos" / source.stem)
        print(json.dumps(summary, default=str) if args.json else
              f"{summary['flagged']} of {summary['frames']} frames flagged in {source} ({summary['frames_per_second']:.1f} frames/s); "
              f"outputs in {out / 'videos' / source.stem}")
    if not args.json and images:
        print(f"{sum(r['flagged'] for r in lines)} of {len(lines)} images flagged; outputs in {out}")
    return 0


def _defend_video(args: argparse.Namespace, preset, defense, source: Path, folder: Path) -> dict[str, Any]:
    """One video (or frame folder): defended video with the prediction overlaid, one JSON line per frame."""
    from ..stream import TemporalFlag, defend_video

    task = preset.task_for(defense.model)
    temporal = TemporalFlag(args.temporal_on, args.temporal_off) if (args.temporal_on, args.temporal_off) != (1, 0) else None
    return defend_video(defense, source, folder, temporal=temporal, prepare=lambda frame: preset.prepare_image(frame)[0],
                        render=task.overlay, progress=not args.no_progress, batch_size=args.batch_size)


# ---------------------------------------------------------------- evaluate
def _named_patches(entries: list[str], flag: str) -> list[tuple[str, torch.Tensor]]:
    pairs = []
    for entry in entries:
        if "=" not in entry:
            raise UsageError(f"{flag} expects NAME=PNG, got {entry!r}")
        name, path = entry.split("=", 1)
        pairs.append((name, _load_patch_file(path)))
    return pairs


def run_evaluate(args: argparse.Namespace) -> int:
    from ..attacks import random_noise_patch
    from ..data.cache import CachedDataset
    from ..defense import ZMask
    from ..evaluation import ExperimentSpec, build_defenses, run_experiments
    from ..models import get_preset

    preset = get_preset(args.model)
    model = preset.build(True)
    zmask = ZMask.load(args.profile, model)
    patches = dict(_named_patches(args.patch, "--patch"))
    if args.random_noise:
        patches = {"random L": random_noise_patch(preset.patch_size("L"), args.seed), **patches}
    beta = {float(k): v for k, v in _named_patches(args.beta_patch, "--beta-patch")}
    alpha = {}
    for key, patch in _named_patches(args.alpha_patch, "--alpha-patch"):
        if ":" not in key:
            raise UsageError(f"--alpha-patch expects ATTACK:ALPHA=PNG, got {key!r}")
        attack, value = key.split(":", 1)
        alpha[(attack, float(value))] = patch
    dataset = CachedDataset(preset.dataset(args.split, args.limit, args.data))
    train = CachedDataset(preset.dataset(preset.train_split, args.train_images, args.data))
    adversarial = [p for name, p in patches.items() if not name.startswith("random")] + list(beta.values())
    masking, detectors = build_defenses(model, zmask, train, adversarial, args.defenses, args.seed, not args.no_progress)
    task = preset.task_for(model, args.split, args.data)
    spec = ExperimentSpec(f"{args.model} on {args.split}", patches, beta, alpha, args.seed, args.batch_size)
    out = Path(args.out)
    write_run_record(out, args, {"profile": str(args.profile)})
    results = run_experiments(task, dataset, zmask, spec, masking, detectors, out, vars(args), progress=not args.no_progress)
    summary = (out / "summary.md").read_text()
    _print(args, summary + f"\nreport written to {out}", {"out": str(out), "results": results})
    return 0


# ---------------------------------------------------------------- bench / demo
def run_bench(args: argparse.Namespace) -> int:
    from .bench import format_benchmarks, run_benchmarks

    threads = [args.threads] if args.threads else [1, 2]
    figures = run_benchmarks(args.model, repeats=args.repeats, quick=args.quick, threads=threads, batch_sizes=args.batch_sizes,
                             literal=not args.no_literal)
    _print(args, format_benchmarks(figures), figures)
    return 0


def run_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo as demo

    out = Path(args.out)
    summary = demo(out, images=args.images, quick=args.quick, seed=args.seed, progress=not args.no_progress)
    write_run_record(out, args)
    _print(args, summary["text"], summary)
    return 0


COMMANDS = {
    "demo": run_demo, "fit": run_fit, "defend": run_defend, "attack": run_attack, "evaluate": run_evaluate,
    "bench": run_bench, "models": run_models, "assets": run_assets,
}
