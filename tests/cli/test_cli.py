"""Every subcommand runs at small sizes; user errors are one line with exit code 2."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from zmask.cli import main
from zmask.models import get_preset


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_console_script_help():
    exe = shutil.which("zmask")
    assert exe is not None, "pip install -e . must install the zmask console script"
    result = subprocess.run([exe, "--help"], capture_output=True, text=True, check=True)
    for name in ("demo", "fit", "defend", "attack", "evaluate", "bench", "models", "assets"):
        assert name in result.stdout
    for name in ("demo", "fit", "defend", "attack", "evaluate", "bench", "models", "assets"):
        sub = subprocess.run([exe, name, "--help"], capture_output=True, text=True)
        assert sub.returncode == 0 and "--json" in sub.stdout


def test_models_and_assets(capsys, assets):
    code, out, _ = run(capsys, "models", "--json")
    rows = json.loads(out)
    assert code == 0 and {"espnet_camvid", "yolov5n_coco"} <= {r["name"] for r in rows}
    code, out, _ = run(capsys, "models", "--layers", "espnet_camvid")
    assert code == 0 and "net.encoder.level2_0" in out.split()
    code, out, _ = run(capsys, "assets", "--json")
    assert code == 0 and all(r["state"] == "ok" for r in json.loads(out))


def test_attack_writes_patch_and_sidecar(capsys, workspace):
    out = workspace / "crafted.png"
    code, stdout, _ = run(capsys, "attack", "--model", "espnet_camvid", "--steps", "2", "--batch-size", "1", "--limit", "2",
                          "--size", "S", "--out", str(out), "--no-progress", "--json")
    assert code == 0
    record = json.loads(stdout)
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["beta"] == 1.0 and sidecar["seed"] == 0 and sidecar["size"] == "S" and record["seconds_per_step"] > 0
    assert len(sidecar["final_loss_terms_last10"]) == 2


def test_fit_defend_outputs(capsys, workspace, profile, noise_patch, assets):
    folder = workspace / "images"
    folder.mkdir(exist_ok=True)
    for line in (assets / "camvid" / "val.txt").read_text().splitlines()[:2]:
        shutil.copy(assets / "camvid" / line.split()[0], folder)
    out = workspace / "defended"
    code, stdout, _ = run(capsys, "defend", str(folder), "--model", "espnet_camvid", "--profile", str(profile), "--out", str(out), "--json")
    assert code == 0
    records = [json.loads(line) for line in stdout.splitlines()]
    assert len(records) == 2 and all({"score", "flagged", "masked_fraction"} <= set(r) for r in records)
    assert len(list((out / "masked").glob("*.png"))) == 2 and len(list((out / "keep_masks").glob("*.png"))) == 2
    run_record = json.loads((out / "run.json").read_text())
    assert run_record["asset_sha256"]["espnet_camvid"].startswith("7d354a25")
    assert run_record["status"] == "complete" and len(run_record["processed"]) == 2 and run_record["threads"] >= 1
    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [line["score"] for line in lines] == [record["score"] for record in records]
    for line in lines:  # every file a line names exists; segmentation writes its prediction as class indices
        assert all((out / relative).is_file() for relative in line["files"].values())
        labels = np.asarray(Image.open(out / line["files"]["prediction"]))
        assert labels.shape == (360, 480) and labels.max() < 12
        keep = np.asarray(Image.open(out / line["files"]["keep_mask"]))
        assert abs((keep < 128).mean() - line["masked_fraction"]) < 0.01  # black = masked, white = kept
    assert sorted(p.name for p in out.iterdir()) == ["heatmaps", "keep_masks", "masked", "predictions", "results.jsonl", "run.json"]


def test_evaluate_writes_report(capsys, workspace, profile, noise_patch):
    out = workspace / "report"
    code, _, _ = run(capsys, "evaluate", "--model", "espnet_camvid", "--profile", str(profile), "--out", str(out), "--patch", f"L={noise_patch}",
                     "--beta-patch", f"1.0={noise_patch}", "--defenses", "zmask", "lgs", "none", "hn", "--limit", "2", "--train-images", "4", "--no-progress")
    assert code == 0
    results = json.loads((out / "results.json").read_text())["results"]
    assert set(results["masking"]) == {"no patch", "L"} and "zmask" in results["masking"]["L"]
    assert "auc" in results["detection"]["L"]["zmask"]
    assert "## Masking" in (out / "summary.md").read_text()
    assert (out / "roc.png").is_file() and (out / "beta_auc.png").is_file() and (out / "examples.png").is_file()


def test_bench_quick(capsys, assets):
    code, out, _ = run(capsys, "bench", "--quick", "--repeats", "1", "--json", "--threads", "1")
    figures = json.loads(out)
    row = figures["per_threads"]["1"]
    assert code == 0 and list(figures["per_threads"]) == ["1"]
    assert row["clean_over_forward"] > 0 and row["flagged_over_forward"] > row["clean_over_forward"] * 0.5
    assert row["speedup_over_literal"] > 0 and row["images_per_second_batch1"] > 0 and row["images_per_second_batch8"] > 0


def test_bench_times_a_whole_profile(capsys, assets):
    from zmask.models import get_preset

    profile = str(get_preset("espnet_camvid").profile())
    code, out, _ = run(capsys, "bench", "--profile", profile, "--repeats", "1", "--batch-sizes", "1", "--no-literal", "--json", "--threads", "1")
    figures = json.loads(out)
    row = figures["per_threads"]["1"]
    from zmask.core.profile import load_profile

    assert code == 0 and figures["profile"] == profile and figures["heatmap"] == list(load_profile(profile).config.heatmap_size)
    assert row["defended_flagged_ms"] > row["defended_clean_ms"] > row["forward_ms"] > 0  # the second pass, the analysis


def test_bench_refuses_quick_with_a_profile(capsys, assets):
    code, _, err = run(capsys, "bench", "--quick", "--profile", "any.safetensors", "--repeats", "1")
    assert code != 0 and "--quick" in err and "--profile" in err and "Traceback" not in err


def test_demo_quick(capsys, workspace):
    code, out, _ = run(capsys, "demo", "--quick", "--out", str(workspace / "demo"), "--no-progress", "--json")
    summary = json.loads(out)
    assert code == 0 and (workspace / "demo" / "demo.png").is_file()
    assert 0.0 <= summary["miou_attacked"] <= 1.0 and "auc_clean_vs_attacked" in summary
    from zmask.fileio import default_file_mode

    assert (workspace / "demo" / "espnet_camvid.zmask.safetensors").stat().st_mode & 0o777 == default_file_mode()  # not 0600
    assert json.loads((workspace / "demo" / "run.json").read_text())["status"] == "complete"


def _one_line_error(capsys, argv, pattern):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert pattern in err
    return err


def test_error_missing_asset(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("ZMASK_ASSETS", str(tmp_path))
    monkeypatch.setenv("ZMASK_CACHE", str(tmp_path / "cache"))
    _one_line_error(capsys, ["attack", "--model", "espnet_camvid", "--steps", "1", "--out", str(tmp_path / "p.png")], "asset 'espnet_camvid'")


def test_error_wrong_path(capsys, profile, tmp_path):
    _one_line_error(capsys, ["defend", str(tmp_path / "nowhere"), "--model", "espnet_camvid", "--profile", str(profile), "--out", str(tmp_path / "o")],
                    "does not exist")


def test_error_unreadable_image(capsys, profile, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"this is not an image")
    _one_line_error(capsys, ["defend", str(bad), "--model", "espnet_camvid", "--profile", str(profile), "--out", str(tmp_path / "o")],
                    f"cannot read image {bad}")


def test_error_profile_for_another_model(capsys, profile, tmp_path, assets):
    image = assets / "camvid" / (assets / "camvid" / "val.txt").read_text().split()[0]
    err = _one_line_error(capsys, ["defend", str(image), "--model", "yolov5n_coco", "--profile", str(profile), "--out", str(tmp_path / "o")],
                          "was fitted for espnet_camvid (model class ESPNetSegmenter), not for yolov5n_coco (model class YOLOv5Detector)")
    assert "shipped" in err and not (tmp_path / "o").exists()


def test_debug_shows_traceback(tmp_path):
    with pytest.raises(Exception):
        main(["defend", str(tmp_path / "nowhere"), "--model", "espnet_camvid", "--profile", str(tmp_path / "p"), "--out", str(tmp_path), "--debug"])


def test_config_file(capsys, tmp_path):
    config = tmp_path / "c.yaml"
    out = tmp_path / "n.png"
    config.write_text(f"model: espnet_camvid\nnoise: true\nsize: M\nseed: 5\nout: {out}\n")
    code, _, _ = run(capsys, "attack", "--config", str(config))  # required options may come from the file
    assert code == 0 and json.loads(out.with_suffix(".json").read_text())["seed"] == 5
    config.write_text("noise: true\n")
    _one_line_error(capsys, ["attack", "--config", str(config)], "--model, --out must be given")
    config.write_text("modle: x\n")
    _one_line_error(capsys, ["attack", "--config", str(config), "--model", "espnet_camvid", "--out", str(out)], "unknown options")


def test_committed_experiment_configs_are_complete():
    """Every file an experiment config names is committed, and every option is a real option."""
    import pathlib

    import yaml

    from zmask.cli import build_parser

    root = pathlib.Path(__file__).resolve().parents[2]
    configs = sorted((root / "experiments").glob("*.yaml"))
    assert configs
    for config in configs:
        text = config.read_text()
        values = yaml.safe_load(text)
        header = re.match(r"# zmask (\w+) --config experiments/(\S+)", text)
        assert header and header.group(2) == config.name, f"{config.name}: the first line names the command that runs it"
        command = header.group(1)
        known = vars(build_parser().parse_args([command]))
        assert set(values) <= set(known), config.name
        if command == "table":  # every report folder it reads is committed
            missing = [e for e in values["report"] if not (root / e.split("=", 1)[1] / "results.json").is_file()]
            assert not missing, f"{config.name}: {missing}"
            continue
        paths = list(values.get("patches", [])) + [e.split("=", 1)[1] for k in ("patch", "beta_patch", "alpha_patch") for e in values.get(k, [])]
        paths += [values["profile"]] if "profile" in values else []
        missing = [p for p in paths if not (root / p).is_file()]
        assert not missing, f"{config.name}: {missing}"
        # the model's own experiment (MODEL.yaml) and fit (MODEL_fit.yaml) are those of the shipped
        # profile; a comparison fit (MODEL_fit_paper.yaml, MODEL_fit_auto.yaml, ...) must not overwrite
        # it (another evaluation of the shipped profile, MODEL_adaptive.yaml say, only reads it)
        shipped = get_preset(values["model"]).profile_record.path
        target = (root / values["profile" if command == "evaluate" else "out"]).resolve()
        if config.stem in (values["model"], f"{values['model']}_fit"):
            assert target == shipped.resolve(), config.name
        elif command == "fit":
            assert target != shipped.resolve(), config.name


def test_every_option_of_every_command_has_help():
    import argparse

    from zmask.cli import build_parser

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert set(commands.choices) >= {"demo", "fit", "defend", "attack", "evaluate", "bench", "models", "assets"}
    bare = [f"{name} {'/'.join(action.option_strings) or action.dest}" for name, sub in commands.choices.items() for action in sub._actions
            if not (action.help or "").removesuffix("(required)").strip()]
    assert not bare, f"options without help: {bare}"


def test_defend_a_preset_without_profile_uses_the_shipped_one(capsys, workspace, assets):
    from zmask.assets import sha256_of

    folder = workspace / "shipped_inputs"
    folder.mkdir(exist_ok=True)
    shutil.copy(assets / "camvid" / (assets / "camvid" / "val.txt").read_text().split()[0], folder)
    out = workspace / "shipped_defended"
    code, stdout, _ = run(capsys, "defend", str(folder), "--model", "espnet_camvid", "--out", str(out), "--json")
    assert code == 0
    record = json.loads(stdout.splitlines()[0])
    preset = get_preset("espnet_camvid")
    assert record["threshold"] == pytest.approx(preset.profile_record.metrics["lambda0"], abs=1e-4)
    run_record = json.loads((out / "run.json").read_text())
    assert run_record["profile_sha256"] == sha256_of(preset.profile()) == preset.profile_record.sha256


def test_fit_target_fpr_must_be_a_probability(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--model", "espnet_camvid", "--patches", str(tmp_path / "p.png"), "--out", str(tmp_path / "p.safetensors"), "--target-fpr", "1.5"])
    assert exit_info.value.code == 2 and "[0, 1]" in capsys.readouterr().err


def test_fit_layer_options_are_checked_before_any_work(capsys, tmp_path):
    (tmp_path / "p.png").write_bytes(b"")  # only its name is checked before the layer options
    base = ["fit", "--model", "espnet_camvid", "--patches", str(tmp_path / "p.png"), "--out", str(tmp_path / "p.safetensors")]
    code, _, err = run(capsys, *base, "--layer-candidates", "net.encoder.b1")
    assert code == 2 and "--layers auto" in err
    code, _, err = run(capsys, *base, "--layers", "auto", "--shallow", "net.encoder.b1")
    assert code == 2 and "leave out --shallow" in err
    code, _, err = run(capsys, *base, "--headroom", "1", "--target-fpr", "0.05")
    assert code == 2 and "leave out --target-fpr" in err
    code, _, err = run(capsys, *base, "--headroom", "-1")
    assert code == 2 and ">= 0" in err
    code, _, err = run(capsys, *base, "--candidate-choice", "effect")
    assert code == 2 and "add --layered" in err


def test_defend_masks_and_heatmaps_follow_one_documented_convention(capsys, tmp_path, assets):
    """keep_masks: white = kept (the API's keep-mask, 1 = keep); heatmaps on one fixed scale (heat /
    HEATMAP_SCALE), so a clean image's stays dark while a patched one's is bright."""
    from zmask.attacks import load_patch
    from zmask.cli.commands import HEATMAP_SCALE
    from zmask.cli.demo import DEMO_PATCHES, PATCH_FOLDER
    from zmask.data import read_image
    from zmask.evaluation import place_patches

    preset = get_preset("espnet_camvid")
    image = preset.prepare_image(read_image(assets / "camvid" / (assets / "camvid" / "val.txt").read_text().split()[0]))[0]
    patched = place_patches(image[None], load_patch(PATCH_FOLDER / DEMO_PATCHES[0])[0], [0], 0)[0][0]
    folder = tmp_path / "inputs"
    folder.mkdir()
    for name, tensor in (("clean", image), ("patched", patched)):
        Image.fromarray((tensor * 255).round().byte().permute(1, 2, 0).numpy()).save(folder / f"{name}.png")
    out = tmp_path / "out"
    code, stdout, _ = run(capsys, "defend", str(folder), "--model", "espnet_camvid", "--out", str(out), "--json")
    assert code == 0
    clean, attacked = (json.loads(line) for line in stdout.splitlines())
    assert not clean["flagged"] and attacked["flagged"] and attacked["masked_fraction"] > 0.01
    for line in (clean, attacked):
        keep = np.asarray(Image.open(out / line["files"]["keep_mask"]))
        assert abs((keep < 128).mean() - line["masked_fraction"]) < 0.01
        heat = np.asarray(Image.open(out / line["files"]["heatmap_shallow"]))
        assert heat.max() == round(min(1.0, line["heatmap_max"]["shallow"] / HEATMAP_SCALE) * 255)
    assert np.asarray(Image.open(out / clean["files"]["heatmap_shallow"])).max() < 40
    assert np.asarray(Image.open(out / attacked["files"]["heatmap_shallow"])).max() > 150
    assert np.asarray(Image.open(out / clean["files"]["keep_mask"])).min() == 255  # nothing masked: all white
    soft = np.asarray(Image.open(out / attacked["files"]["soft_mask"])) / 255
    assert soft.max() > attacked["mask_threshold"] > np.asarray(Image.open(out / clean["files"]["soft_mask"])).max() / 255
