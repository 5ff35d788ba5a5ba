"""``zmask demo``: the whole Z-Mask pipeline on ESPNet-CamVid with the project's committed patches."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from ..core.calibration import roc_auc

from ..attacks import load_patch
from ..core.fusion import FusionTraining
from ..data.cache import CachedDataset
from ..errors import ZMaskError
from ..evaluation import FitPlan, NoDefense, PatchSetting, ZMaskDefense, evaluate, fit_zmask, place_patches
from ..evaluation.report import examples_figure
from ..models import get_preset

PATCH_FOLDER = Path(__file__).resolve().parents[1] / "patches"
DEMO_PATCHES = ("espnet_camvid_L_beta1.0.png", "espnet_camvid_L_beta0.7.png", "espnet_camvid_L_beta0.5.png")


def run_demo(out: Path, images: int = 40, quick: bool = False, seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """Fit, attack, detect, mask and re-segment; writes the figure, summary and profile into ``out``
    and returns the measured figures."""
    started = time.time()
    missing = [name for name in DEMO_PATCHES if not (PATCH_FOLDER / name).is_file()]
    if missing:
        raise ZMaskError(f"the committed demo patches {missing} are missing from {PATCH_FOLDER}; reinstall zmask")
    patches = [load_patch(PATCH_FOLDER / name)[0] for name in DEMO_PATCHES]
    preset = get_preset("espnet_camvid")
    model = preset.build(True)
    train = CachedDataset(preset.dataset("train"))
    val = CachedDataset(preset.dataset("val", limit=4 if quick else images))
    plan = (FitPlan(8, 8, 8, batch_size=4, fusion=FusionTraining(epochs=3, seed=seed), seed=seed) if quick
            else FitPlan(80, 100, 60, fusion=FusionTraining(epochs=30, batch_size=15, learning_rate=0.01, seed=seed), seed=seed))
    defense, fit_report = fit_zmask(model, preset.config(), train, patches, plan, progress)
    out.mkdir(parents=True, exist_ok=True)
    defense.save(out / "espnet_camvid.zmask.safetensors")  # atomically, with the umask's mode
    task = preset.task_for(model, "val")
    attack = PatchSetting("L patch (beta=1)", patches[0])
    results, _ = evaluate(task, val, [PatchSetting("clean"), attack], [NoDefense(model), ZMaskDefense(defense)], seed, 4, progress)
    clean_scores, attacked_scores = results["clean"]["zmask"].scores, results[attack.name]["zmask"].scores
    auc = roc_auc(clean_scores, attacked_scores)
    timing = _time_per_image(defense, val, patches[0], seed)
    examples_figure(out / "demo.png", _figure_rows(defense, val, patches[0], seed, 2 if not quick else 1), task)
    summary = {
        "miou_clean": results["clean"]["none"].task["miou"],
        "miou_clean_defended": results["clean"]["zmask"].task["miou"],
        "miou_attacked": results[attack.name]["none"].task["miou"],
        "miou_attacked_defended": results[attack.name]["zmask"].task["miou"],
        "auc_clean_vs_attacked": auc,
        "tpr": results[attack.name]["zmask"].summary().get("flag_rate"),
        "fpr": results["clean"]["zmask"].summary().get("flag_rate"),
        "mask_iou": results[attack.name]["zmask"].summary().get("mask_iou"),
        "threshold": defense.state.threshold, "images": len(val), "fit": fit_report, **timing,
        "seconds": time.time() - started, "outputs": str(out),
    }
    text = (
        f"Z-Mask demo: ESPNet on {len(val)} CamVid val images (mIoU, patch pixels ignored)\n"
        f"  clean                 : {summary['miou_clean']:.3f}   with Z-Mask {summary['miou_clean_defended']:.3f}\n"
        f"  attacked (L patch)    : {summary['miou_attacked']:.3f}   with Z-Mask {summary['miou_attacked_defended']:.3f}\n"
        f"  detection             : AUC {auc:.3f}, TPR {summary['tpr']:.2f}, FPR {summary['fpr']:.2f}, patch-mask IoU {summary['mask_iou']:.2f}\n"
        f"  time per image (1 CPU image): undefended {timing['ms_undefended']:.0f} ms, defended clean {timing['ms_defended_clean']:.0f} ms, "
        f"defended attacked {timing['ms_defended_attacked']:.0f} ms\n"
        f"  outputs: {out / 'demo.png'}, {out / 'summary.md'}, {out / 'summary.json'} ({summary['seconds']:.0f} s)"
    )
    summary["text"] = text
    (out / "summary.json").write_text(json.dumps({k: v for k, v in summary.items() if k != "text"}, indent=2, default=str))
    (out / "summary.md").write_text("# Z-Mask demo\n\n![demo](demo.png)\n\n```\n" + text + "\n```\n")
    return summary


def _time_per_image(defense, dataset, patch, seed) -> dict[str, float]:
    image = dataset[0]["image"][None]
    attacked, _ = place_patches(image, patch, [0], seed)
    timings = {}
    with torch.no_grad():
        for name, function in (("ms_undefended", lambda: defense.model(image)), ("ms_defended_clean", lambda: defense(image)),
                               ("ms_defended_attacked", lambda: defense(attacked))):
            function()
            start = time.perf_counter()
            for _ in range(3):
                function()
            timings[name] = (time.perf_counter() - start) / 3 * 1e3
    return timings


def _figure_rows(defense, dataset, patch, seed, count) -> list[dict[str, Any]]:
    rows = []
    for index in range(count):
        image = dataset[index]["image"][None]
        attacked, _ = place_patches(image, patch, [index], seed)
        with torch.no_grad():
            clean_out = defense.model(image)
            attacked_out = defense.model(attacked)
            result = defense(attacked, gate=True)
        shown = defense.apply_mask(attacked, result.detection.keep_mask)
        rows.append({"panels": [("clean", image[0], clean_out[0]), ("attacked", attacked[0], attacked_out[0]),
                                (f"attacked + Z-Mask (d={float(result.detection.score[0]):.3f})", shown[0], result.output[0])]})
    return rows
