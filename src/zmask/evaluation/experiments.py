"""The paper's experiments on a fitted model: masking table (Table 1), detection ROC and the beta
sweep (Fig. 7), defense-aware alpha sweep (Fig. 9), with reports written to a folder."""

from __future__ import annotations

import dataclasses
import hashlib
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from .._version import __version__
from ..attacks import PhysicalConditions
from ..contracts import Defense, Task
from ..core.calibration import roc_auc
from ..data.batching import dataset_length
from ..defense import ZMask
from ..distributed import rank_and_world
from .defenses import NoDefense, ZMaskDefense, report_rows
from .report import examples_figure, fmt, fmt_interval, markdown_table, roc_figure, sweep_figure, write_json
from .runner import DefenseMetrics, PatchSetting, evaluate, place_patches
from .uncertainty import Bootstrap, BootstrapConfig, recovery


@dataclass
class ExperimentSpec:
    """What to run. ``patches``: name -> patch for the masking table (e.g. S, M, L, random L);
    ``beta_patches``: beta -> patch; ``alpha_patches``: (attack, alpha) -> patch; ``bootstrap``: the
    confidence intervals (over images) attached to every number (``*_ci`` entries); ``physical``:
    also evaluate each patch of ``patches`` seen through these conditions (rows "NAME physical")."""

    name: str
    patches: dict[str, torch.Tensor] = field(default_factory=dict)
    beta_patches: dict[float, torch.Tensor] = field(default_factory=dict)
    alpha_patches: dict[tuple[str, float], torch.Tensor] = field(default_factory=dict)
    seed: int = 0
    batch_size: int = 4
    examples: int = 2
    bootstrap: BootstrapConfig = field(default_factory=BootstrapConfig)
    physical: PhysicalConditions | None = None


class _SettingCache:
    """Evaluates each distinct patch once: a patch that appears in several experiments (the L patch is
    also beta = 1 and alpha = 1) reuses its metrics, since placements depend only on seed and image."""

    def __init__(self, task: Task, dataset: Dataset, spec: ExperimentSpec, progress: bool) -> None:
        self.task, self.dataset, self.spec, self.progress = task, dataset, spec, progress
        self.done: dict[str, dict[str, Any]] = {}

    @staticmethod
    def _key(setting: PatchSetting) -> str:
        if setting.patch is None:
            return "no patch"
        digest = hashlib.sha256(setting.patch.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
        return digest + str(tuple(setting.patch.shape)) + (repr(setting.physical) if setting.physical is not None else "")

    def run(self, settings: Sequence[PatchSetting], defenses: Sequence[Defense]) -> dict[str, dict[str, Any]]:
        """metrics[setting][row] for every row the defenses produce (their own and their observers')."""
        names = [row for d in defenses for row in report_rows(d)]
        todo = [s for s in settings if not set(names) <= set(self.done.get(self._key(s), {}))]
        unique = list({self._key(s): s for s in todo}.values())
        if unique:
            table, _ = evaluate(self.task, self.dataset, unique, defenses, self.spec.seed, self.spec.batch_size, self.progress)
            for setting in unique:
                self.done.setdefault(self._key(setting), {}).update(table[setting.name])
        return {s.name: {n: self.done[self._key(s)][n] for n in names} for s in settings}


def run_experiments(
    task: Task, dataset: Dataset, zmask: ZMask, spec: ExperimentSpec, masking_defenses: Sequence[Defense], detectors: Sequence[Defense],
    output: str | Path, configuration: dict[str, Any] | None = None, progress: bool = True,
) -> dict[str, Any]:
    """Run everything in ``spec`` and write ``results.json``, ``summary.md`` and figures into ``output``.

    Under ``torch.distributed`` every rank evaluates its shard of ``dataset`` and computes the
    same results; rank 0 alone writes the files."""
    output = Path(output)
    rank, world = rank_and_world()
    primary = rank == 0  # under torch.distributed every rank evaluates its shard, rank 0 writes
    if primary:
        output.mkdir(parents=True, exist_ok=True)
    started = time.time()
    key = task.metric_key
    # Defenses that run a forward pass of their own; the others observe one (``report_rows``).
    all_defenses = list({d.name: d for d in list(masking_defenses) + [d for d in detectors if not getattr(d, "observes_undefended", False)]}.values())
    results: dict[str, Any] = {
        "metric": key, "experiment": spec.name,
        "defenses": {row: {"masks": d.masks if row == d.name else False, "detects": d.detects if row == d.name else True}
                     for d in all_defenses for row in report_rows(d)},
    }
    # Table 1: task metric under each patch setting, for each masking defense.
    settings = [PatchSetting("no patch")] + [PatchSetting(name, patch) for name, patch in spec.patches.items()]
    if spec.physical is not None:
        settings += [PatchSetting(f"{name} physical", patch, spec.physical) for name, patch in spec.patches.items()]
    cache = _SettingCache(task, dataset, spec, progress)
    table = cache.run(settings, all_defenses)
    boot = Bootstrap(next(iter(table["no patch"].values())).indices, spec.bootstrap)
    results["bootstrap"] = {"resamples": spec.bootstrap.resamples, "confidence": spec.bootstrap.confidence, "seed": spec.bootstrap.seed,
                            "images": len(boot.keys)}
    results["masking"] = {s: {d: _with_intervals(m, key, boot) for d, m in row.items()} for s, row in table.items()}
    results["recovery"] = _recoveries(table, [d.name for d in masking_defenses], key, boot)
    # Detection: ROC AUC clean vs each patched setting, and TPR at the calibrated threshold.
    clean_scores = {d: m.scores for d, m in table["no patch"].items() if m.scores}
    detection: dict[str, dict[str, dict[str, Any]]] = {}
    for setting in [s.name for s in settings[1:]]:
        detection[setting] = {}
        for name, metrics in table[setting].items():
            if name in clean_scores:
                clean = table["no patch"][name]
                detection[setting][name] = {
                    "auc": roc_auc(clean_scores[name], metrics.scores),
                    "tpr": sum(metrics.flagged) / len(metrics.flagged) if metrics.flagged else None,
                    "fpr": (sum(clean.flagged) / len(clean.flagged)) if clean.flagged else None,
                    "auc_ci": boot.auc_interval(clean.scores, metrics.scores),
                    "tpr_ci": boot.mean_interval(metrics.flagged), "fpr_ci": boot.mean_interval(clean.flagged),
                }
    results["detection"] = detection
    results["operating_point"] = {
        "threshold": zmask.state.threshold, "calibration": dataclasses.asdict(zmask.state.calibration) if zmask.state.calibration is not None else None,
        "evaluation": {"clean_flag_rate": results["masking"]["no patch"].get(ZMaskDefense.name, {}).get("flag_rate"),
                       "clean_flag_rate_ci": results["masking"]["no patch"].get(ZMaskDefense.name, {}).get("flag_rate_ci"),
                       "tpr": {s: row.get(ZMaskDefense.name, {}).get("tpr") for s, row in detection.items()}},
    }
    if spec.patches and primary:
        last = list(spec.patches)[-1]
        roc_figure(output / "roc.png", {d: (clean_scores[d], table[last][d].scores) for d in clean_scores}, f"clean vs {last}")
    # Fig. 7: detection AUC and task metric against beta.
    if spec.beta_patches:
        betas = sorted(spec.beta_patches)
        sweep = cache.run([PatchSetting(f"beta={b}", spec.beta_patches[b]) for b in betas], all_defenses)
        results["beta_sweep"] = {
            str(b): {d: {**m.summary(), "auc": roc_auc(clean_scores.get(d, []), m.scores),
                         "auc_ci": boot.auc_interval(table["no patch"][d].scores, m.scores) if d in clean_scores else None}
                     for d, m in sweep[f"beta={b}"].items()} for b in betas
        }
        if primary:
            sweep_figure(output / "beta_auc.png", betas, {d: [results["beta_sweep"][str(b)][d]["auc"] for b in betas] for d in clean_scores},
                         "beta", "ROC AUC (clean vs patched)", "detection vs beta")
            sweep_figure(output / "beta_metric.png", betas, {d.name: [results["beta_sweep"][str(b)][d.name][key] for b in betas] for d in masking_defenses},
                         "beta", key, f"{key} vs beta")
    # Fig. 9: defense-aware attacks against alpha.
    if spec.alpha_patches:
        alpha_settings = [PatchSetting(f"{attack} alpha={alpha}", patch) for (attack, alpha), patch in sorted(spec.alpha_patches.items())]
        sweep = cache.run(alpha_settings, [d for d in all_defenses if d.masks])
        results["alpha_sweep"] = {s: {d: _with_intervals(m, key, boot) for d, m in row.items()} for s, row in sweep.items()}
        control = next((name for name in table if name.startswith("random")), None)
        if control is not None and ZMaskDefense.name in table[control]:
            results["adaptive"] = _against_control(results["alpha_sweep"], sweep, table[control][ZMaskDefense.name], control, key, boot)
        if primary:
            for attack in sorted({a for a, _ in spec.alpha_patches}):
                alphas = sorted(alpha for a, alpha in spec.alpha_patches if a == attack)
                rows = [results["alpha_sweep"][f"{attack} alpha={alpha}"] for alpha in alphas]
                series = {f"{d} {key}": [row[d][key] for row in rows] for d in rows[0] if key in rows[0][d]}
                series["zmask TPR"] = [row["zmask"].get("flag_rate", float("nan")) for row in rows]
                sweep_figure(output / f"alpha_{attack}.png", alphas, series, "alpha", f"{key} / TPR", f"{attack}-attack vs alpha")
    # Fig. 6: clean / attacked / attacked + defended examples.
    if spec.examples and spec.patches and primary:
        examples_figure(output / "examples.png", _examples(dataset, zmask, spec), task)
    results["seconds"] = time.time() - started
    meta = {"zmask_version": __version__, "torch": torch.__version__, "python": platform.python_version(),
            "seed": spec.seed, "world_size": world, "configuration": configuration or {}, "zmask_config": zmask.config.to_dict(), "threshold": zmask.state.threshold}
    if primary:
        write_json(output / "results.json", {"meta": meta, "results": results})
        (output / "summary.md").write_text(summary_markdown(results, meta))
    return results


def _with_intervals(metrics: DefenseMetrics, key: str, boot: Bootstrap) -> dict[str, Any]:
    """``metrics.summary()`` plus bootstrap intervals of the task metric, flag rate and mask IoU."""
    summary = metrics.summary()
    if boot.covers(metrics):
        summary[f"{key}_ci"] = boot.metric_interval(metrics, key) if key in summary else None
        if metrics.flagged:
            summary["flag_rate_ci"] = boot.mean_interval(metrics.flagged)
        if metrics.mask_iou:
            summary["mask_iou_ci"] = boot.mean_interval(metrics.mask_iou)
    return summary


def _against_control(summaries: dict[str, dict[str, Any]], sweep: dict[str, dict[str, DefenseMetrics]], control: DefenseMetrics,
                     control_name: str, key: str, boot: Bootstrap) -> dict[str, Any]:
    """Per defense-aware attack, Z-Mask's flag rate, patch-mask IoU and defended metric (from the
    sweep's ``summaries``) next to the random-noise control's defended metric, and the gap (attack -
    control) with its interval: what the attack takes that a harmless patch of the same size would
    not. The strongest attack is the one with the lowest gap."""
    rows: dict[str, Any] = {}
    for setting, row in sweep.items():
        defended = row.get(ZMaskDefense.name)
        if defended is None or key not in defended.task or key not in control.task:
            continue
        summary = summaries[setting][ZMaskDefense.name]
        rows[setting] = {
            "flag_rate": summary.get("flag_rate"), "flag_rate_ci": summary.get("flag_rate_ci"),
            "mask_iou": summary.get("mask_iou"), "mask_iou_ci": summary.get("mask_iou_ci"),
            key: defended.task[key], f"{key}_ci": summary.get(f"{key}_ci"),
            "control": control.task[key], "gap": defended.task[key] - control.task[key],
            "gap_ci": boot.gap_interval(defended, control, key),
        }
    strongest = min(rows, key=lambda name: rows[name]["gap"]) if rows else None
    return {"control": control_name, "strongest": strongest, "attacks": rows}


def _recoveries(table: dict[str, dict[str, DefenseMetrics]], masking: list[str], key: str, boot: Bootstrap) -> dict[str, Any]:
    """recovery[setting][defense]: the share of the metric lost to the patch (undefended, clean vs
    patched) that the defense gives back, with its interval; needs the undefended row."""
    none = NoDefense.name
    if none not in table["no patch"] or key not in table["no patch"][none].task:
        return {}
    clean = table["no patch"][none]
    result: dict[str, Any] = {}
    for setting, row in table.items():
        if setting == "no patch" or none not in row:
            continue
        attacked = row[none]
        result[setting] = {
            d: {"recovery": recovery(row[d].task[key], attacked.task[key], clean.task[key]),
                "recovery_ci": boot.recovery_interval(row[d], attacked, clean, key)}
            for d in masking if d != none and d in row and key in row[d].task
        }
    return result


def _examples(dataset: Dataset, zmask: ZMask, spec: ExperimentSpec) -> list[dict[str, Any]]:
    name, patch = list(spec.patches.items())[-1]
    rows = []
    for index in range(min(spec.examples, dataset_length(dataset))):
        image = dataset[index]["image"][None]
        attacked, _ = place_patches(image, patch, [index], spec.seed)
        with torch.no_grad():
            clean_out = NoDefense(zmask.model)(image).output
            attacked_out = NoDefense(zmask.model)(attacked).output
            defended = ZMaskDefense(zmask)(attacked)
        assert defended.masked_images is not None  # ZMaskDefense always returns what the model saw
        rows.append({"panels": [("clean", image[0], clean_out[0]), (f"attacked ({name})", attacked[0], attacked_out[0]),
                                ("attacked + Z-Mask", defended.masked_images[0], defended.output[0])]})
    return rows


def summary_markdown(results: dict[str, Any], meta: dict[str, Any]) -> str:
    """The paper's table layouts in Markdown; columns are every evaluated defense (``results["defenses"]``).
    Brackets hold the bootstrap interval over images (``results["bootstrap"]``)."""
    key = results["metric"]
    lines = [f"# {results['experiment']}", "", f"zmask {meta['zmask_version']}, torch {meta['torch']}, seed {meta['seed']}, lambda0 {meta['threshold']}", ""]
    boot = results.get("bootstrap")
    if boot and boot["resamples"]:
        lines += [f"Brackets: {boot['confidence']:.0%} bootstrap intervals over the {boot['images']} evaluated images "
                  f"({boot['resamples']} resamples, seed {boot['seed']}; the same resampled image sets for every number).", ""]
    point = results.get("operating_point")
    if point:
        calibration = point.get("calibration") or {}
        evaluation = point["evaluation"]
        lines += ["## Operating point of Z-Mask", "",
                  "| | threshold | TPR | FPR (clean flag rate) |", "|---|---|---|---|",
                  f"| calibration data ({calibration.get('criterion', '-')}) | {fmt(point['threshold'], 4)} | {fmt(calibration.get('true_positive_rate'))} | "
                  f"{fmt(calibration.get('false_positive_rate'))} |"]
        for setting, tpr in evaluation["tpr"].items():
            lines.append(f"| evaluation, {setting} | {fmt(point['threshold'], 4)} | {fmt(tpr)} | "
                         f"{fmt_interval(evaluation['clean_flag_rate'], evaluation['clean_flag_rate_ci'])} |")
        lines.append("")
    masking = results["masking"]
    masking_defenses = [d for d, kind in results["defenses"].items() if kind["masks"]]
    lines += [f"## Masking ({key}; patch pixels ignored; columns as the paper's Table 1)", "",
              markdown_table(list(masking), masking_defenses, lambda r, c: fmt_interval(masking[r].get(c, {}).get(key), masking[r].get(c, {}).get(f"{key}_ci"))), ""]
    recoveries = results.get("recovery", {})
    if recoveries:
        columns = sorted({d for row in recoveries.values() for d in row})
        lines += [f"## Recovery of the lost {key} ((defended - attacked) / (clean - attacked), undefended clean and attacked)", "",
                  markdown_table(list(recoveries), columns, lambda r, c: fmt_interval(recoveries[r].get(c, {}).get("recovery"), recoveries[r].get(c, {}).get("recovery_ci"))), ""]
    lines += ["## Patch-masking IoU (predicted vs true patch pixels)", "",
              markdown_table([r for r in masking if r != "no patch"], masking_defenses,
                             lambda r, c: fmt_interval(masking[r].get(c, {}).get("mask_iou"), masking[r].get(c, {}).get("mask_iou_ci"))), ""]
    detection = results.get("detection", {})
    detectors = sorted({d for row in detection.values() for d in row})
    if detection:
        lines += ["## Detection (ROC AUC clean vs patched / TPR at the calibrated threshold / FPR on clean images)", "",
                  markdown_table(list(detection), detectors, lambda r, c: " / ".join(
                      fmt_interval(detection[r].get(c, {}).get(name), detection[r].get(c, {}).get(f"{name}_ci")) for name in ("auc", "tpr", "fpr"))), ""]
    if "beta_sweep" in results:
        sweep = results["beta_sweep"]
        lines += ["## Activation-aware patches (beta sweep; AUC / " + key + ")", "",
                  markdown_table(list(sweep), detectors + [d for d in masking_defenses if d not in detectors],
                                 lambda r, c: f"{fmt_interval(sweep[r].get(c, {}).get('auc'), sweep[r].get(c, {}).get('auc_ci'))} / {fmt(sweep[r].get(c, {}).get(key))}"), ""]
    if "alpha_sweep" in results:
        sweep = results["alpha_sweep"]
        columns = sorted({d for row in sweep.values() for d, m in row.items() if key in m})
        lines += ["## Defense-aware attacks (alpha sweep; " + key + " / Z-Mask TPR)", "",
                  markdown_table(list(sweep), columns, lambda r, c: f"{fmt_interval(sweep[r].get(c, {}).get(key), sweep[r].get(c, {}).get(f'{key}_ci'))} / "
                                                                    f"{fmt(sweep[r].get(c, {}).get('flag_rate'))}"), ""]
    adaptive = results.get("adaptive")
    if adaptive and adaptive["attacks"]:
        rows = adaptive["attacks"]
        lines += [f"## Adaptive attacks against Z-Mask next to the random-noise control ({adaptive['control']}; gap = defended "
                  f"{key} under the attack - under the control; strongest: {adaptive['strongest']})", "",
                  f"| attack | flagged | patch-mask IoU | defended {key} | control {key} | gap |", "|---|---|---|---|---|---|"]
        for name, row in rows.items():
            lines.append(f"| {name} | {fmt_interval(row['flag_rate'], row['flag_rate_ci'])} | {fmt_interval(row['mask_iou'], row['mask_iou_ci'])} | "
                         f"{fmt_interval(row[key], row[f'{key}_ci'])} | {fmt(row['control'])} | {fmt_interval(row['gap'], row['gap_ci'])} |")
        lines.append("")
    return "\n".join(lines) + "\n"
