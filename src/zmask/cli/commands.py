"""Implementations of the ``zmask`` subcommands (argument parsing lives in :mod:`zmask.cli.parser`)."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from .._version import __version__
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
        input_size = input_size or recorded.state.input_size
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
    rows: list[dict[str, Any]] = [{"name": p.name, "task": p.task, "input": list(p.input_size), "shallow": list(p.shallow_layers), "deep": list(p.deep_layers),
             "heatmap": list(p.heatmap_size), "weights": p.pretrained_source, "description": p.description,
             "shipped_profile": p.profile_record.file if p.profile_record else None, "label_map": p.label_map_lines()}
            for p in PRESETS.values()]
    lines = []
    for r in rows:
        lines.append(f"{r['name']:32s} {r['task']:13s} {r['input'][0]}x{r['input'][1]:<5d} S={','.join(r['shallow'])}  D={','.join(r['deep'])}"
                     + ("  (profile shipped)" if r["shipped_profile"] else ""))
        if r["label_map"]:  # a model trained on other labels, scored on the preset's dataset through this map
            lines += [f"    label map: {line}" for line in r["label_map"]]
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
    if profile is not None:
        _check_profile_model(Path(profile), preset, model)
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
        path = save_patch(patch, args.out, {"model": args.model, "kind": "random-noise", "size": args.size, "seed": args.seed,
                                            "written_by": f"zmask {__version__}"})
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
    metadata.update(seconds_per_step=(time.time() - started) / max(config.steps, 1), resumed_from=args.resume, command="zmask attack",
                    written_by=f"zmask {__version__}")
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
    if args.headroom is not None and args.target_fpr is not None:
        raise UsageError("--headroom sets the thresholds from the clean scores alone: leave out --target-fpr")
    if args.headroom is not None and not (math.isfinite(args.headroom) and args.headroom >= 0):
        raise UsageError(f"--headroom {args.headroom} must be a finite number >= 0")
    if args.candidate_choice != "clearance" and not args.layered:
        raise UsageError("--candidate-choice chooses among the keep-mask candidates of a layered defense: add --layered")
    preset = _model_preset(args)
    overrides = {}
    if args.shallow:
        overrides["shallow_layers"] = tuple(args.shallow)
    if args.deep:
        overrides["deep_layers"] = tuple(args.deep)
    config = preset.config(**overrides)
    if args.heatmap_size:
        config = config.at_heatmap(tuple(args.heatmap_size))
    model = preset.build(True)
    dataset = CachedDataset(preset.dataset(args.split, None, args.data))
    patches = [_load_patch_file(p) for p in args.patches]
    plan = FitPlan(args.statistics_images, args.fusion_images, args.calibration_images,
                   placements=args.placements, fusion=FusionTraining(epochs=args.epochs, batch_size=15, learning_rate=0.01, seed=args.seed, min_steps=300),
                   seed=args.seed, target_fpr=args.target_fpr, hard_negatives=args.hard_negatives, auto_layers=args.layers == "auto", calibrate_mask=args.calibrate_mask,
                   layer_candidates=tuple(args.layer_candidates) if args.layer_candidates else None, max_overhead=args.max_overhead,
                   layered=args.layered, candidate_choice=args.candidate_choice, headroom=args.headroom)
    needed = plan.statistics_images + plan.fusion_images + plan.calibration_images
    if needed > len(dataset):
        raise UsageError(f"the {args.split} split has {len(dataset)} images, the plan needs {needed}: lower --statistics-images/--fusion-images/--calibration-images")
    defense, report = fit_zmask(model, config, dataset, patches, plan, progress=not args.no_progress)
    defense.state.provenance = {**(defense.state.provenance or {}), "model": preset.name}  # named when a profile meets another model
    path = defense.save(args.out)  # atomically: a full disk or a file-size limit leaves an earlier profile intact
    write_run_record(Path(str(path) + ".run"), args, {"report": report})
    calibration = report["calibration"]
    if "cost" in report and not args.json:
        cost = report["cost"]
        grids = ", ".join(f"{g['heatmap_size'][0]}x{g['heatmap_size'][1]}: {g['clean_over_forward']:.2f}x" for g in cost["grids"])
        print(f"heatmap grid {cost['chosen'][0]}x{cost['chosen'][1]} (defended clean frame / forward at {cost['threads']} threads: {grids}; "
              f"budget {1 + cost['max_overhead']:.2f}x{'' if cost['within_budget'] else ', NOT met'})")
        for layer, grids_evidence in cost["evidence"].items():
            print(f"  {layer}: " + "; ".join(f"{grid}: AUC {e['auc']:.3f}, inside/outside {e['localisation']:.2f}" for grid, e in grids_evidence.items()))
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
# Heatmap PNGs of H_S and H_D: the heat (SPR of the Z-scores, in standard deviations of the clean
# activations) clipped to [0, HEATMAP_SCALE] and mapped linearly to 0..255: one scale for every
# image, so a clean image stays dark and a patch shows bright (ESPNet-CamVid: clean < 1, patched
# ~15; YOLOv5n: clean < 0.7, patched ~2.2). The soft patch mask M~ is written on its own [0, 1] scale.
HEATMAP_SCALE = 16.0
# Detection boxes written to the JSON lines: those scoring at least this (as the video overlay draws).
MIN_BOX_SCORE = 0.25


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
                raise UsageError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in folder {path}; give --frames if it holds a video's frames")
            images += found
        elif path.is_file():
            (videos if path.suffix.lower() in VIDEO_SUFFIXES else images).append(path)
        else:
            raise UsageError(f"input {path} does not exist")
    return images, videos


def _to_png(tensor: torch.Tensor, path: Path) -> None:
    """A 1 x H x W or 3 x H x W tensor in [0, 1] as an 8-bit PNG (its folder created on first use)."""
    import numpy as np
    from PIL import Image

    array = (tensor.detach().cpu().float().clamp(0, 1) * 255).round().to(torch.uint8)
    array = array[0] if array.shape[0] == 1 else array.permute(1, 2, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(array.numpy())).save(path)


def _label_png(labels: torch.Tensor, path: Path) -> None:
    """An H x W map of class indices as a PNG: 8-bit grey below 256 classes, else 16-bit."""
    import numpy as np
    from PIL import Image

    array = labels.detach().cpu().numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    if array.max(initial=0) < 256:
        Image.fromarray(array.astype(np.uint8), "L").save(path)
    else:
        Image.fromarray(array.astype(np.uint16)).save(path)


def _detections(output: Any) -> list[dict[str, Any]] | None:
    """The boxes of a detection output (a one-item list of a dict with boxes, scores, labels) that
    score at least ``MIN_BOX_SCORE``, in the model input's pixels; ``None`` for other outputs."""
    if not (isinstance(output, list) and len(output) == 1 and isinstance(output[0], dict) and "boxes" in output[0]):
        return None
    found = output[0]
    boxes = found["boxes"].detach().cpu().float()
    scores = found.get("scores", torch.ones(len(boxes))).detach().cpu().float()
    labels = found.get("labels", torch.zeros(len(boxes), dtype=torch.long)).detach().cpu()
    keep = scores >= MIN_BOX_SCORE
    return [{"box": [round(v, 1) for v in box], "score": round(float(score), 4), "label": int(label)}
            for box, score, label in zip(boxes[keep].tolist(), scores[keep], labels[keep])]


def _prediction(output: Any, out: Path, name: str) -> dict[str, Any]:
    """What the model predicted, for an image's JSON line: segmentation logits (1 x C x H x W)
    become a label PNG ``predictions/<name>.png``; detection outputs their boxes."""
    boxes = _detections(output)
    if boxes is not None:
        return {"detections": boxes}
    if isinstance(output, torch.Tensor) and output.dim() == 4 and output.shape[0] == 1 and output.shape[1] > 1:
        relative = f"predictions/{name}.png"
        _label_png(output[0].argmax(0), out / relative)
        return {"prediction": relative}
    return {}


def _check_profile_model(path: Path, preset, model) -> None:
    """A profile fitted for another model class is refused naming both models, before the
    (layer-by-layer) fit check could report a missing layer instead."""
    from ..assets import sha256_of
    from ..core.profile import load_profile
    from ..errors import ProfileError
    from ..models import PRESETS

    recorded = load_profile(path)
    fitted_class, this_class = recorded.model_class, type(model).__name__
    if not fitted_class or fitted_class == this_class:
        return
    state = getattr(recorded, "state", recorded)
    fitted_for = (getattr(state, "provenance", None) or {}).get("model")
    if fitted_for is None:
        digest = sha256_of(path)
        fitted_for = next((p.name for p in PRESETS.values() if p.profile_record is not None and p.profile_record.sha256 == digest), None)
    shipped = " (or leave out --profile to use its shipped one)" if preset.profile_record is not None else ""
    raise ProfileError(f"profile {path} was fitted for {fitted_for or 'another model'} (model class {fitted_class}), not for "
                       f"{preset.name} (model class {this_class}): give a profile fitted for {preset.name}{shipped}")


def _load_defense(args: argparse.Namespace, preset, profile: Path):
    """The model of ``preset`` and the defense of ``profile`` for it (model class checked first)."""
    from ..defense import ZMask

    model = preset.build(True)
    _check_profile_model(profile, preset, model)
    return model, ZMask.load(profile, model, allow_other_weights=args.allow_other_weights)


def run_defend(args: argparse.Namespace) -> int:
    """Defend images and videos; every output goes under ``--out`` (see ``_defend_image``,
    ``_defend_video``), one JSON line per image and per video frame in ``results.jsonl``, and
    ``run.json`` rewritten after every item (and at least every second within a video)."""
    from .records import RunRecord

    preset = _model_preset(args, args.profile)
    profile = _profile_for(args, preset)
    images, videos = _split_inputs(args.inputs, args.frames)
    _, defense = _load_defense(args, preset, profile)
    out = Path(args.out)
    names, video_names = _output_names(images), _output_names(videos)
    record = RunRecord(out, args, {**_profile_record(profile), "images": len(images), "videos": [str(v) for v in videos],
                                   "results": "results.jsonl", "heatmap_scale": HEATMAP_SCALE})
    processed: list[dict[str, Any]] = []
    failed: list[dict[str, str]] = []
    lines: list[dict[str, Any]] = []
    record.update(status="running", processed=processed, failed=failed)
    status = "failed"
    try:
        with open(out / "results.jsonl", "w", encoding="utf-8") as results:
            for path, name in zip(images, names):
                try:
                    line = _defend_image(preset, defense, path, out, name)
                except (ZMaskError, OSError) as error:
                    failed.append(_report_failure(args, path, error))
                    record.update(failed=failed)
                    continue
                results.write(json.dumps(line) + "\n")
                results.flush()
                processed.append({"input": str(path), "output": name})
                record.update(processed=processed)
                lines.append(line)
                if not args.json:
                    print(f"{'PATCH' if line['flagged'] else 'clean':5s} score={line['score']:.4f} masked={line['masked_fraction']:.3f} {path}")
                else:
                    print(json.dumps(line))
            for source, name in zip(videos, video_names):
                try:
                    summary = _defend_video(args, preset, defense, source, out, name, results, record)
                except (ZMaskError, OSError) as error:
                    failed.append(_report_failure(args, source, error))
                    record.update(failed=failed, current=None)
                    with contextlib.suppress(OSError):  # no empty folder left by a video that failed at once
                        (out / "videos").rmdir()
                    continue
                processed.append({"input": str(source), "output": f"videos/{name}.mp4", "frames": summary["frames"],
                                  "flagged": summary["flagged"], "corrupt_frames": summary["corrupt_frames"],
                                  "skipped_packets": summary["skipped_packets"]})
                record.update(processed=processed, current=None)
                damaged = (f"; {summary['corrupt_frames']} frames decoded with errors, {summary['skipped_packets']} packets skipped "
                           "(see their 'problem' in results.jsonl)" if summary["corrupt_frames"] or summary["skipped_packets"] else "")
                print(json.dumps(summary, default=str) if args.json else
                      f"{summary['flagged']} of {summary['frames']} frames flagged in {source} ({summary['frames_per_second']:.1f} frames/s)"
                      f"{damaged}; video {summary['video']}")
        status = "complete"
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    finally:  # an interrupted video stays in "current", with the frames done (every one has its line)
        record.update(status=status, processed=processed, failed=failed)
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
    """Defend one image file; its outputs, all in the model input's frame (the image as the preset
    prepares it: resized or letterboxed), are ``masked/<name>.png`` (what the model saw),
    ``keep_masks/<name>.png`` (white = kept, black = masked: the API's keep-mask, 1 = keep),
    ``heatmaps/<name>_soft_mask.png`` (the soft patch mask M~, 0..1 as 0..255; pixels above the
    line's ``mask_threshold`` are masked when the image is flagged), ``heatmaps/<name>_shallow.png``
    and ``_deep.png`` (H_S and H_D, on the fixed scale ``HEATMAP_SCALE``), all three at the
    heatmap grid's size, the prediction (``predictions/<name>.png`` of class
    indices, or boxes in the JSON line), and the returned JSON line."""
    from ..data import read_image

    image, note = preset.prepare_image(read_image(path))
    with torch.no_grad():
        result = defense(image[None], return_heatmaps=True)
    detection = result.detection
    keep = detection.keep_mask[0]
    files = {"masked": f"masked/{name}.png", "keep_mask": f"keep_masks/{name}.png", "soft_mask": f"heatmaps/{name}_soft_mask.png",
             "heatmap_shallow": f"heatmaps/{name}_shallow.png", "heatmap_deep": f"heatmaps/{name}_deep.png"}
    _to_png(defense.apply_mask(image[None], keep[None])[0], out / files["masked"])
    _to_png(keep.float(), out / files["keep_mask"])
    _to_png(detection.soft_mask[0].float(), out / files["soft_mask"])
    heat = {"shallow": result.heatmaps.shallow[0].float(), "deep": result.heatmaps.deep[0].float()}
    for kind, values in heat.items():
        _to_png(values / HEATMAP_SCALE, out / files[f"heatmap_{kind}"])
    line = {"image": str(path), "output": name, "score": float(detection.score[0]), "flagged": bool(detection.flagged[0]),
            "masked_fraction": float(1 - keep.float().mean()), "threshold": defense.state.threshold,
            "mask_threshold": float(defense.config.mask_threshold), "preprocessing": note,
            "heatmap_max": {kind: float(values.max()) for kind, values in heat.items()}}
    prediction = _prediction(result.output, out, name)
    if "prediction" in prediction:
        files["prediction"] = prediction.pop("prediction")
    return {**line, **prediction, "files": files}


def _defend_video(args: argparse.Namespace, preset, defense, source: Path, out: Path, name: str, results, record) -> dict[str, Any]:
    """One video (or frame folder): ``videos/<name>.mp4`` (the masked frames with the prediction
    drawn over them; a fragmented MP4 that plays up to its last second if the run is killed), and
    one line per frame in ``results.jsonl`` (flushed before the frame is encoded), each naming the
    video and frame, with the boxes of a detection model."""
    from ..stream import TemporalFlag, defend_video

    task = preset.task_for(defense.model)
    temporal = TemporalFlag(args.temporal_on, args.temporal_off) if (args.temporal_on, args.temporal_off) != (1, 0) else None
    output = f"videos/{name}.mp4"
    frames_done = 0

    def on_frame(line: dict[str, Any], result) -> None:
        nonlocal frames_done
        boxes = _detections(result.output)
        entry = {"video": str(source), "output": output, "frame": line.pop("index"), **line,
                 **({"detections": boxes} if boxes is not None else {})}
        results.write(json.dumps(entry) + "\n")
        results.flush()
        frames_done += 1
        record.update(every=1.0, current={"input": str(source), "output": output, "frames_processed": frames_done})

    return defend_video(defense, source, out / "videos", temporal=temporal, prepare=lambda frame: preset.prepare_image(frame)[0],
                        render=task.overlay, progress=not args.no_progress, batch_size=args.batch_size, video_name=f"{name}.mp4",
                        on_frame=on_frame)


# ---------------------------------------------------------------- evaluate
def _named_patches(entries: list[str], flag: str, form: str = "NAME=PNG") -> list[tuple[str, str]]:
    """(name, PNG path) of each ``NAME=PNG`` entry (split at the first ``=``); an entry without
    ``=``, with an empty side, or a name given twice is a UsageError showing ``form``."""
    pairs: list[tuple[str, str]] = []
    for entry in entries:
        name, sep, path = entry.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise UsageError(f"{flag} expects {form}, got {entry!r}")
        if any(name == seen for seen, _ in pairs):
            raise UsageError(f"{flag} {name!r} is given twice: give each setting once")
        pairs.append((name, path))
    return pairs


def _weight(text: str, flag: str, form: str, entry: str) -> float:
    """A beta or alpha of an ``--beta-patch`` / ``--alpha-patch`` entry: a number in [0, 1] (the attack's own range)."""
    import math

    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 <= value <= 1.0:  # NaN fails too
        raise UsageError(f"{flag} expects {form} with a number in [0, 1], got {text!r} in {entry!r}")
    return value


def _evaluation_patches(args: argparse.Namespace) -> tuple[dict[str, torch.Tensor], dict[float, torch.Tensor], dict[tuple[str, float], torch.Tensor]]:
    """The patches of ``--patch``, ``--beta-patch`` and ``--alpha-patch``, every entry parsed and every
    PNG read before any model is built (a typo costs no minutes of setup)."""
    patches = {name: _load_patch_file(path) for name, path in _named_patches(args.patch, "--patch")}
    beta: dict[float, torch.Tensor] = {}
    for key, path in _named_patches(args.beta_patch, "--beta-patch", "BETA=PNG"):
        value = _weight(key, "--beta-patch", "BETA=PNG", f"{key}={path}")
        if value in beta:
            raise UsageError(f"--beta-patch beta {value:g} is given twice: give each beta once")
        beta[value] = _load_patch_file(path)
    alpha: dict[tuple[str, float], torch.Tensor] = {}
    for key, path in _named_patches(args.alpha_patch, "--alpha-patch", "ATTACK:ALPHA=PNG"):
        attack, sep, text = key.rpartition(":")
        if not sep or not attack.strip():
            raise UsageError(f"--alpha-patch expects ATTACK:ALPHA=PNG, got {key + '=' + path!r}")
        setting = (attack, _weight(text, "--alpha-patch", "ATTACK:ALPHA=PNG", f"{key}={path}"))
        if setting in alpha:
            raise UsageError(f"--alpha-patch {attack}:{setting[1]:g} is given twice: give each setting once")
        alpha[setting] = _load_patch_file(path)
    return patches, beta, alpha


def run_evaluate(args: argparse.Namespace) -> int:
    """Under ``torchrun`` each rank evaluates its share of the images; rank 0 writes the report."""
    from ..distributed import process_group_from_environment

    given = _evaluation_patches(args)
    with process_group_from_environment() as (rank, _):
        return _evaluate(args, primary=rank == 0, given=given)


def _evaluate(args: argparse.Namespace, primary: bool, given: tuple[dict, dict, dict] | None = None) -> int:
    from ..attacks import PhysicalConditions, random_noise_patch
    from ..data.cache import CachedDataset
    from ..evaluation import BootstrapConfig, ExperimentSpec, build_defenses, run_experiments

    from ..evaluation import DEFENSES
    from .records import RunRecord

    args.defenses = args.defenses or DEFENSES.names()
    preset = _model_preset(args, args.profile)
    profile = _profile_for(args, preset)
    model, zmask = _load_defense(args, preset, profile)
    patches, beta, alpha = given if given is not None else _evaluation_patches(args)
    if args.random_noise:
        patches = {"random L": random_noise_patch(preset.patch_size("L"), args.seed), **patches}
    progress = primary and not args.no_progress
    dataset = CachedDataset(preset.dataset(args.split, args.limit, args.data))
    train = CachedDataset(preset.dataset(preset.train_split, args.train_images, args.data))
    adversarial = [p for name, p in patches.items() if not name.startswith("random")] + list(beta.values())
    masking, detectors = build_defenses(model, zmask, train, adversarial, args.defenses, args.seed, progress)
    task = preset.task_for(model, args.split, args.data)
    spec = ExperimentSpec(f"{args.model} on {args.split}", patches, beta, alpha, args.seed, args.batch_size,
                          bootstrap=BootstrapConfig(args.bootstrap, seed=args.seed), physical=PhysicalConditions() if args.physical else None)
    out = Path(args.out)
    record = RunRecord(out, args, _profile_record(profile)) if primary else None
    if record is not None:
        record.update(status="running")
    status = "failed"
    try:
        results = run_experiments(task, dataset, zmask, spec, masking, detectors, out, vars(args), progress=progress)
        status = "complete"
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    finally:
        if record is not None:
            record.update(status=status)
    if primary:
        summary = (out / "summary.md").read_text()
        _print(args, summary + f"\nreport written to {out}", {"out": str(out), "results": results})
    return 0


# ---------------------------------------------------------------- bench / demo
def run_bench(args: argparse.Namespace) -> int:
    from .bench import format_benchmarks, run_benchmarks

    threads = [args.threads] if args.threads else [1, 2]
    figures = run_benchmarks(args.model, repeats=args.repeats, quick=args.quick, threads=threads, batch_sizes=args.batch_sizes,
                             literal=not args.no_literal, profile=args.profile)
    _print(args, format_benchmarks(figures), figures)
    return 0


def run_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo as demo

    from .records import RunRecord

    out = Path(args.out)
    record = RunRecord(out, args)
    record.update(status="running")
    status = "failed"
    try:
        summary = demo(out, images=args.images, quick=args.quick, seed=args.seed, progress=not args.no_progress)
        status = "complete"
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    finally:
        record.update(status=status)
    _print(args, summary["text"], summary)
    return 0


def run_table(args: argparse.Namespace) -> int:
    import json

    from ..core.profile import load_profile
    from ..evaluation.models_table import ModelRow, models_markdown, row_from_report
    from ..fileio import atomic_write_text
    from ..models import get_preset
    from .bench import run_benchmarks

    rows: list[ModelRow] = []
    profiles: list[str | Path] = []
    for entry in args.report:
        name, _, folder = entry.partition("=")
        preset = get_preset(name)
        report = json.loads((Path(folder) / "results.json").read_text())
        recorded = report["meta"].get("configuration", {}).get("profile")
        # the report's own profile where it still is, else the preset's shipped one (a report made from a copy)
        profile = recorded if recorded and Path(recorded).is_file() else preset.profile()
        rows.append(row_from_report(name, report["results"], load_profile(profile).config))
        profiles.append(profile)
    threads = [str(count) for count in args.bench_threads]
    if not args.no_bench:
        for row, profile in zip(rows, profiles):
            figures = run_benchmarks(row.preset, repeats=args.repeats, threads=args.bench_threads, batch_sizes=(1,), literal=False,
                                     progress=not args.no_progress, profile=profile)
            row.costs = {count: figures["per_threads"][count] for count in threads}
    notes = [f"Regenerate: `zmask table --config {args.config}`" if args.config else "", "Reports: " + ", ".join(
        f"[{entry.split('=', 1)[0]}]({Path(entry.split('=', 1)[1]).name}/summary.md)" for entry in args.report)]
    text = models_markdown(rows, threads if not args.no_bench else [], [n for n in notes if n])
    atomic_write_text(args.out, text, fsync=False)
    _print(args, text + f"\nwritten to {args.out}", {"out": args.out, "rows": [vars(row) for row in rows]})
    return 0


COMMANDS = {
    "demo": run_demo, "fit": run_fit, "defend": run_defend, "attack": run_attack, "evaluate": run_evaluate,
    "bench": run_bench, "models": run_models, "assets": run_assets, "table": run_table,
}
