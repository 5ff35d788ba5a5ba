"""Implementations of the ``zmask`` subcommands (argument parsing lives in :mod:`zmask.cli.parser`)."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ..errors import UsageError, ZMaskError
from .parser import VIDEO_SUFFIXES
from .records import write_run_record


def _print(args: argparse.Namespace, human: str, data: Any) -> None:
    print(json.dumps(data, default=str) if args.json else human)


def _load_patch_file(path: str) -> torch.Tensor:
    from ..attacks import load_patch

    return load_patch(path)[0]


_USER_MODEL_OPTIONS = ("task", "input_size", "num_classes", "ignore_index")


@contextlib.contextmanager
def _importable_from_here():
    """Let ``--model my_module:factory`` find modules in the current folder, as ``python -m`` would,
    while the factory is first imported (later uses find it in ``sys.modules``)."""
    import os

    here = os.getcwd()
    added = here not in sys.path and "" not in sys.path
    if added:
        sys.path.insert(0, here)
    try:
        yield
    finally:
        if added and here in sys.path:
            sys.path.remove(here)


def _model_preset(args: argparse.Namespace, profile: str | Path | None = None):
    """The preset named by ``--model``, or one made on the fly from ``--model module:factory`` and the
    options that describe it (``--task``, ``--input-size``, ``--num-classes``, ``--shallow/--deep``,
    where missing read from ``profile``)."""
    from ..models import get_preset, is_factory_spec, preset_from_factory

    if not is_factory_spec(args.model):
        given = [f"--{name.replace('_', '-')}" for name in _USER_MODEL_OPTIONS if getattr(args, name, None) is not None]
        if given:
            raise UsageError(f"{', '.join(given)} describe your own model (--model module:factory); preset {args.model!r} has its own")
        return get_preset(args.model)
    shallow, deep, input_size = getattr(args, "shallow", None), getattr(args, "deep", None), args.input_size
    if profile is not None and not (shallow and deep and input_size):
        from ..core.profile import load_profile

        recorded = load_profile(profile)
        if not (shallow or deep):
            shallow, deep = list(recorded.config.shallow_layers), list(recorded.config.deep_layers)
        input_size = input_size or recorded.input_size
    needed = [("--task", args.task), ("--input-size", input_size)]
    if args.command == "fit":
        needed += [("--shallow", shallow), ("--deep", deep)]
    missing = [flag for flag, value in needed if not value]
    if missing:
        raise UsageError(f"--model {args.model} is your own model: give {' and '.join(missing)} "
                         f"(list its layers with `zmask models --layers {args.model}`)")
    with _importable_from_here():
        return preset_from_factory(args.model, args.task, tuple(input_size), tuple(shallow or ()), tuple(deep or ()),
                                   args.num_classes or 0, 255 if args.ignore_index is None else args.ignore_index)


def _profile_for(args: argparse.Namespace, preset) -> Path:
    """``--profile``, or the profile shipped with the preset (SHA-256 checked)."""
    return Path(args.profile) if args.profile else preset.profile()


def _profile_record(path: Path) -> dict[str, Any]:
    """What a run record says about the profile it used: its path and SHA-256."""
    from ..assets import sha256_of

    return {"profile": str(path), "profile_sha256": sha256_of(path)}


# ---------------------------------------------------------------- models / assets
def run_models(args: argparse.Namespace) -> int:
    from ..models import PRESETS, build_from_factory, get_preset, is_factory_spec

    if args.layers:
        if is_factory_spec(args.layers):
            with _importable_from_here():
                model = build_from_factory(args.layers, pretrained=False)
        else:
            model = get_preset(args.layers).build(False)
        names = [name for name, _ in model.named_modules() if name]
        _print(args, "\n".join(names), names)
        return 0
    rows = [{"name": p.name, "task": p.task, "input": list(p.input_size), "shallow": list(p.shallow_layers), "deep": list(p.deep_layers),
             "heatmap": list(p.heatmap_size), "weights": p.pretrained_source, "description": p.description,
             "shipped_profile": p.profile_record.file if p.profile_record else None} for p in PRESETS.values()]
    lines = [f"{r['name']:32s} {r['task']:13s} {r['input'][0]}x{r['input'][1]:<5d} S={','.join(r['shallow'])}  D={','.join(r['deep'])}"
             + ("  (profile shipped)" if r["shipped_profile"] else "") for r in rows]
    _print(args, "\n".join(lines), rows)
    return 0


def run_assets(args: argparse.Namespace) -> int:
    from ..assets import download_asset, search_locations, status

    if args.download:
        path = download_asset(args.download)
        _print(args, f"downloaded {args.download} to {path}", {"name": args.download, "path": str(path)})
        return 0
    rows = status()
    lines = [f"looked in: {', '.join(f'{folder} ({origin})' for folder, origin in search_locations())}"]
    lines += [f"{r['state']:9s} {r['name']:28s} {r['path']}\n          source: {r['source']} ({r['licence']})" + (f"\n          {r['detail']}" if r['detail'] else "") for r in rows]
    _print(args, "\n".join(lines), rows)
    return 0


# ---------------------------------------------------------------- attack
def craft_patch(preset_name, size: str, config, profile: str | Path | None = None, split: str = "train", limit: int | None = None,
                initial: torch.Tensor | None = None, progress: bool = True, data_root=None) -> tuple[Any, dict[str, Any]]:
    """Craft a patch for a preset (a name or a :class:`~zmask.models.ModelPreset`) on its training
    split; returns the result and sidecar metadata.

    ``profile``: a fitted Z-Mask profile, needed for activation-aware (beta < 1) and defense-aware attacks.
    """
    from ..attacks import PatchAttack
    from ..data.cache import CachedDataset
    from ..defense import ZMask
    from ..models import ModelPreset, get_preset

    preset = preset_name if isinstance(preset_name, ModelPreset) else get_preset(preset_name)
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
        "model": preset.name, "task": preset.task, "size": size, "split": split, "images": len(data), "loss": config.objective,
        "beta": config.beta, "alpha": config.alpha, "profile": str(profile) if profile else None, "defense_attack": config.defense_attack, "seed": config.seed,
        "attack": config.to_dict(), "final_loss_terms_last10": final,
    }
    return result, metadata


def run_attack(args: argparse.Namespace) -> int:
    from ..attacks import AttackConfig, random_noise_patch, save_patch

    preset = _model_preset(args, args.profile)
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
    profile = None
    if args.beta < 1.0 or args.defense_attack:
        if not args.profile and preset.profile_record is None:
            raise UsageError("beta < 1 and defense-aware attacks need --profile (a fitted Z-Mask profile from `zmask fit`)")
        profile = _profile_for(args, preset)
    initial = _load_patch_file(args.resume) if args.resume else None
    started = time.time()
    result, metadata = craft_patch(preset, args.size, config, profile=profile, split=args.split, limit=args.limit,
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

    if args.layer_candidates and args.layers != "auto":
        raise UsageError("--layer-candidates needs --layers auto")
    if args.layers == "auto" and (args.shallow or args.deep):
        raise UsageError("--layers auto chooses S and D: leave out --shallow and --deep")
    preset = _model_preset(args)
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
                   seed=args.seed, target_fpr=args.target_fpr, hard_negatives=args.hard_negatives, auto_layers=args.layers == "auto", calibrate_mask=args.calibrate_mask,
                   layer_candidates=tuple(args.layer_candidates) if args.layer_candidates else None)
    needed = plan.statistics_images + plan.fusion_images + plan.calibration_images
    if needed > len(dataset):
        raise UsageError(f"the {args.split} split has {len(dataset)} images, the plan needs {needed}: lower --statistics-images/--fusion-images/--calibration-images")
    defense, report = fit_zmask(model, config, dataset, patches, plan, progress=not args.no_progress)
    path = defense.save(args.out)
    write_run_record(Path(str(path) + ".run"), args, {"report": report})
    calibration = report["calibration"]
    if "layer_selection" in report:
        from ..evaluation import LayerSelection

        selection = LayerSelection.from_dict(report["layer_selection"])
        if not args.json:
            print(f"layers chosen on the training images: S = {', '.join(selection.shallow)}; D = {', '.join(selection.deep)}\n{selection.table()}")
    _print(args, f"wrote profile {path}: lambda0 = {report['threshold']:.4f} (calibration AUC {calibration['auc']:.3f}, "
                 f"TPR {calibration['true_positive_rate']:.3f}, FPR {calibration['false_positive_rate']:.3f}); soft-mask threshold "
                 f"{report['mask_threshold']:.2f} (patch-mask IoU {report['calibration_mask_iou']:.3f} on the patched calibration samples)",
           {"profile": str(path), **report})
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
    from ..defense import ZMask

    preset = _model_preset(args, args.profile)
    profile = _profile_for(args, preset)
    model = preset.build(True)
    defense = ZMask.load(profile, model, allow_other_weights=args.allow_other_weights)
    images, videos = _split_inputs(args.inputs, args.frames)
    out = Path(args.out)
    for folder in ("masked", "masks", "heatmaps"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    names, video_names = _output_names(images), _output_names(videos)
    base = {**_profile_record(profile), "images": len(images), "videos": [str(v) for v in videos], "results": "results.jsonl"}
    # Written now as "running" and again when the run ends, so an interrupted run says what was done
    # (results.jsonl gets one line per image as soon as it is processed).
    write_run_record(out, args, {**base, "status": "running", "processed": [], "failed": []})
    processed: list[dict[str, str]] = []
    failed: list[dict[str, str]] = []
    lines = []
    status = "interrupted"
    try:
        with open(out / "results.jsonl", "w") as results:
            for path, name in zip(images, names):
                try:
                    record = _defend_image(preset, defense, path, out, name)
                except (ZMaskError, OSError) as error:
                    failed.append(_report_failure(args, path, error))
                    continue
                results.write(json.dumps(record) + "\n")
                results.flush()
                processed.append({"input": str(path), "output": name})
                lines.append(record)
                if not args.json:
                    print(f"{'PATCH' if record['flagged'] else 'clean':5s} score={record['score']:.4f} masked={record['masked_fraction']:.3f} {path}")
                else:
                    print(json.dumps(record))
        for source, name in zip(videos, video_names):
            try:
                summary = _defend_video(args, preset, defense, source, out / "videos" / name)
            except (ZMaskError, OSError) as error:
                failed.append(_report_failure(args, source, error))
                continue
            processed.append({"input": str(source), "output": f"videos/{name}"})
            print(json.dumps(summary, default=str) if args.json else
                  f"{summary['flagged']} of {summary['frames']} frames flagged in {source} ({summary['frames_per_second']:.1f} frames/s); "
                  f"outputs in {out / 'videos' / name}")
        status = "complete"
    finally:
        write_run_record(out, args, {**base, "status": status, "processed": processed, "failed": failed})
    if not args.json and images:
        print(f"{sum(r['flagged'] for r in lines)} of {len(lines)} images flagged; outputs in {out}"
              + (f"; {len(failed)} inputs could not be processed" if failed else ""))
    return EXIT_FAILED_INPUTS if failed else 0


EXIT_FAILED_INPUTS = 2  # the usage-error code: some inputs could not be read


def _output_names(paths: list[Path]) -> list[str]:
    """A distinct, deterministic output name per input: its stem; where stems collide
    (case-insensitively: ``x.png`` and ``x.jpg``, or one name in two folders) the stem and the
    suffix (``x_png``); where those still collide, a counter (``x_png_2``) in input order."""
    from collections import Counter

    stems = Counter(path.stem.casefold() for path in paths)
    names: list[str] = []
    used: set[str] = set()
    for path in paths:
        name = path.stem if stems[path.stem.casefold()] == 1 else f"{path.stem}_{path.suffix.lstrip('.')}"
        candidate, count = name, 1
        while candidate.casefold() in used:
            count += 1
            candidate = f"{name}_{count}"
        used.add(candidate.casefold())
        names.append(candidate)
    return names


def _report_failure(args: argparse.Namespace, path: Path, error: Exception) -> dict[str, str]:
    """One line on stderr for an input that could not be processed; the run goes on."""
    message = str(error).splitlines()[0] if str(error) else type(error).__name__
    if str(path) not in message:
        message = f"{path}: {message}"
    print(f"zmask {args.command}: error: {message}", file=sys.stderr)
    return {"input": str(path), "error": message}


def _defend_image(preset, defense, path: Path, out: Path, name: str) -> dict[str, Any]:
    """Defend one image file: masked image, mask and heatmap PNGs named ``name``, and its JSON record."""
    from ..data import read_image

    image, note = preset.prepare_image(read_image(path))
    with torch.no_grad():
        result = defense(image[None], return_heatmaps=True)
    detection = result.detection
    keep = detection.keep_mask[0]
    _to_png(defense.apply_mask(image[None], keep[None])[0], out / "masked" / f"{name}.png")
    _to_png(1 - keep, out / "masks" / f"{name}.png")
    shallow = result.heatmaps.shallow[0]
    _to_png(shallow / shallow.max().clamp(min=1e-9), out / "heatmaps" / f"{name}_shallow.png")
    return {"image": str(path), "output": name, "score": float(detection.score[0]), "flagged": bool(detection.flagged[0]),
            "masked_fraction": float(1 - keep.mean()), "threshold": defense.threshold, "preprocessing": note}


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
    """Under ``torchrun`` each rank evaluates its share of the images; rank 0 writes the report."""
    from ..distributed import process_group_from_environment

    with process_group_from_environment() as (rank, _):
        return _evaluate(args, primary=rank == 0)


def _evaluate(args: argparse.Namespace, primary: bool) -> int:
    from ..attacks import PhysicalConditions, random_noise_patch
    from ..data.cache import CachedDataset
    from ..defense import ZMask
    from ..evaluation import BootstrapConfig, ExperimentSpec, build_defenses, run_experiments

    preset = _model_preset(args, args.profile)
    profile = _profile_for(args, preset)
    model = preset.build(True)
    zmask = ZMask.load(profile, model, allow_other_weights=args.allow_other_weights)
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
    progress = primary and not args.no_progress
    dataset = CachedDataset(preset.dataset(args.split, args.limit, args.data))
    train = CachedDataset(preset.dataset(preset.train_split, args.train_images, args.data))
    adversarial = [p for name, p in patches.items() if not name.startswith("random")] + list(beta.values())
    masking, detectors = build_defenses(model, zmask, train, adversarial, args.defenses, args.seed, progress)
    task = preset.task_for(model, args.split, args.data)
    spec = ExperimentSpec(f"{args.model} on {args.split}", patches, beta, alpha, args.seed, args.batch_size,
                          bootstrap=BootstrapConfig(args.bootstrap, seed=args.seed), physical=PhysicalConditions() if args.physical else None)
    out = Path(args.out)
    if primary:
        write_run_record(out, args, _profile_record(profile))
    results = run_experiments(task, dataset, zmask, spec, masking, detectors, out, vars(args), progress=progress)
    if primary:
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
