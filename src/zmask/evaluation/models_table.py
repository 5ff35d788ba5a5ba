"""The paper's Table 1 across models: one row per preset from its evaluation report and its cost.

A row reads the ``results.json`` that ``zmask evaluate`` wrote for the preset (clean, attacked and
defended task metric on the L patch, recovery, clean flag rate, TPR on L, the random-noise
control's flag rate, each with its bootstrap interval where the report has one) and the costs that
``zmask bench`` measures (forward ms, defended clean frame and flagged frame over the forward, per
thread count). ``zmask table`` assembles them into ``docs/results/models.md``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..config import ZMaskConfig
from ..errors import InputError
from ..fileio import TABLE_MARKER


@dataclass
class ModelRow:
    """One preset's row: task metric figures as (value, interval or None), flags, layers and costs."""

    preset: str
    metric: str
    images: int
    clean: tuple[float, list[float] | None]
    attacked: tuple[float, list[float] | None]
    defended: tuple[float, list[float] | None]
    recovery: tuple[float, list[float] | None]
    clean_flag_rate: tuple[float, list[float] | None]
    tpr_l: tuple[float, list[float] | None]
    noise_flag_rate: tuple[float, list[float] | None]
    shallow: tuple[str, ...]
    deep: tuple[str, ...]
    heatmap: tuple[int, int]
    costs: dict[str, dict[str, float]] = field(default_factory=dict)  # threads -> bench figures


def _value(record: Mapping[str, Any], key: str) -> tuple[float, list[float] | None]:
    if key not in record:
        raise InputError(f"the report has no {key!r} here ({sorted(record)})")
    return float(record[key]), record.get(f"{key}_ci")


def row_from_report(preset: str, results: Mapping[str, Any], config: ZMaskConfig, patch: str = "L",
                    control: str = "random L") -> ModelRow:
    """The row of ``preset`` from a ``results.json``'s ``results`` (``zmask evaluate`` with at least
    the defenses ``zmask`` and ``none``, the ``patch`` and the random-noise ``control``)."""
    metric = results["metric"]
    masking = results["masking"]
    for name in ("no patch", patch, control):
        if name not in masking or not {"zmask", "none"} <= set(masking[name]):
            raise InputError(f"the report of {preset} has no {name!r} row with the zmask and none defenses; evaluate with "
                             f"--patch {patch}=... --random-noise --defenses zmask none")
    clean, attacked, defended = masking["no patch"], masking[patch], masking[patch]["zmask"]
    return ModelRow(
        preset, metric, int(clean["zmask"].get("images") or results.get("bootstrap", {}).get("images") or 0), _value(clean["none"], metric), _value(attacked["none"], metric),
        _value(defended, metric), _value(results["recovery"][patch]["zmask"], "recovery"), _value(clean["zmask"], "flag_rate"),
        _value(defended, "flag_rate"), _value(masking[control]["zmask"], "flag_rate"),
        tuple(config.shallow_layers), tuple(config.deep_layers), config.heatmap_size,
    )


def _figure(value: tuple[float, list[float] | None], digits: int = 3) -> str:
    number, interval = value
    text = f"{number:.{digits}f}"
    return f"{text} [{interval[0]:.2f}, {interval[1]:.2f}]" if interval else text


def models_markdown(rows: Sequence[ModelRow], threads: Sequence[str], notes: Sequence[str] = ()) -> str:
    """The table (one row per preset) and the cost table (per thread count), as Markdown."""
    lines = [TABLE_MARKER, "", "# Z-Mask across models", "",
             "The paper's Table 1 across the presets: evaluation splits only, the shipped profiles, patches crafted on the "
             "training splits; 95% bootstrap intervals over images in brackets. *attacked* / *defended*: the task metric with "
             "the L patch, without and with Z-Mask (patch pixels ignored); *recovery*: the share of the metric lost to the patch "
             "that Z-Mask gives back; flag rates are the share of images Z-Mask flags.", "",
             "| preset | metric (images) | clean | attacked (L) | defended (L) | recovery | clean flagged | TPR on L | random-noise L flagged |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row.preset} | {row.metric} ({row.images}) | {_figure(row.clean)} | {_figure(row.attacked)} | {_figure(row.defended)} | "
                     f"{_figure(row.recovery)} | {_figure(row.clean_flag_rate)} | {_figure(row.tpr_l)} | {_figure(row.noise_flag_rate)} |")
    lines += ["", "Cost per frame, measured by `zmask bench` in this run (medians of interleaved runs; the shipped profile's grid and "
              "layers): the forward pass, and the defended clean frame (analysis included) and the flagged frame (analysis, "
              "masking and the second pass) as multiples of it.", ""]
    header = "| preset | heatmap | S / D |" + "".join(f" forward ms ({t} thr) | clean / forward ({t} thr) | flagged / forward ({t} thr) |"
                                                      for t in threads)
    lines += [header, "|---|---|---|" + "---|---|---|" * len(threads)]
    for row in rows:
        cells = "".join(f" {row.costs[t]['forward_ms']:.1f} | {row.costs[t]['clean_over_forward']:.2f} | {row.costs[t]['flagged_over_forward']:.2f} |"
                        if t in row.costs else " - | - | - |" for t in threads)
        lines.append(f"| {row.preset} | {row.heatmap[0]}x{row.heatmap[1]} | {', '.join(row.shallow)} / {', '.join(row.deep)} |{cells}")
    if notes:
        lines += ["", *notes]
    return "\n".join(lines) + "\n"
