"""Extending zmask from outside: a baseline registered in this file alone shows up in
``zmask evaluate``'s report; the CLI's error policy; videos through ``zmask defend``."""

from __future__ import annotations

import json
from typing import ClassVar

import pytest
import torch

from zmask.cli import main
from zmask.contracts import DefenseResult, FitContext
from zmask.evaluation import DEFENSES


class BrightnessDefense:
    """A dummy baseline: flags images brighter than the training images' mean brightness and
    masks nothing."""

    name: ClassVar[str] = "brightness"
    masks: ClassVar[bool] = True
    detects: ClassVar[bool] = True

    def __init__(self, model, threshold: float) -> None:
        self.model, self.threshold = model, threshold

    @classmethod
    def build(cls, context: FitContext) -> BrightnessDefense:
        mean = torch.cat([images.mean((1, 2, 3)) for images in context.clean_batches]).mean()
        return cls(context.model, float(mean))

    def __call__(self, images: torch.Tensor) -> DefenseResult:
        score = images.mean((1, 2, 3))
        return DefenseResult(self.model(images), score, score > self.threshold)


@pytest.fixture
def brightness_defense():
    DEFENSES.register()(BrightnessDefense)
    yield BrightnessDefense
    DEFENSES.remove(BrightnessDefense.name)


def test_registered_baseline_appears_in_evaluate_report(capsys, workspace, profile, noise_patch, brightness_defense):
    out = workspace / "report_brightness"
    code = main(["evaluate", "--model", "espnet_camvid", "--profile", str(profile), "--out", str(out), "--patch", f"L={noise_patch}",
                 "--defenses", "zmask", "brightness", "none", "--limit", "2", "--train-images", "4", "--no-progress"])
    assert code == 0
    results = json.loads((out / "results.json").read_text())["results"]
    assert "miou" in results["masking"]["L"]["brightness"] and "flag_rate" in results["masking"]["L"]["brightness"]
    assert results["detection"]["L"]["brightness"]["auc"] is not None
    summary = (out / "summary.md").read_text()
    masking_header = next(line for line in summary.splitlines() if line.startswith("| | ") and "zmask" in line)
    assert "brightness" in masking_header
    assert summary.count("brightness") >= 3  # masking, mask IoU and detection tables


def test_unknown_defense_is_a_one_line_error(capsys, profile, tmp_path):
    code = main(["evaluate", "--model", "espnet_camvid", "--profile", str(profile), "--out", str(tmp_path), "--defenses", "zmsk",
                 "--limit", "1", "--train-images", "2", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "unknown defense 'zmsk'" in err and "did you mean 'zmask'" in err and len(err.splitlines()) == 1


def test_a_bug_shows_its_traceback(monkeypatch, tmp_path):
    """Only user errors (ZMaskError, OSError) become one-line messages; anything else propagates."""
    from zmask.cli import commands

    def broken(args):
        raise RuntimeError("a bug")

    monkeypatch.setitem(commands.COMMANDS, "models", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["models"])


def test_defend_video_writes_video_and_frame_log(capsys, workspace, profile, assets):
    from zmask.attacks import load_patch
    from zmask.data import read_image
    from zmask.data.video import open_frames, write_video
    from zmask.evaluation import place_patches

    lines = (assets / "camvid" / "val.txt").read_text().splitlines()[:3]
    frames = [read_image(assets / "camvid" / line.split()[0]) for line in lines]
    patch = load_patch(noise_patch_path(workspace))[0]
    attacked = [place_patches(frame[None], patch, [i], 0)[0][0] for i, frame in enumerate(frames)]
    clip = workspace / "clip.mp4"
    write_video(clip, frames + attacked, fps=5.0)
    out = workspace / "defended_video"
    code = main(["defend", str(clip), "--model", "espnet_camvid", "--profile", str(profile), "--out", str(out), "--json", "--no-progress"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["frames"] == 6 and summary["frames_per_second"] > 0
    # one layout for images and videos: the per-frame lines in the top-level results.jsonl, the video in videos/
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["frame"] for r in records] == list(range(6)) and {r["video"] for r in records} == {str(clip)}
    assert {r["output"] for r in records} == {"videos/clip.mp4"} and not any(r["corrupt"] for r in records)
    assert sum(r["flagged"] for r in records) == summary["flagged"]
    written = list(open_frames(out / "videos" / "clip.mp4"))
    assert len(written) == 6 and tuple(written[0].shape) == (3, 360, 480)
    assert sorted(p.name for p in out.iterdir()) == ["results.jsonl", "run.json", "videos"]  # no empty image folders
    run_record = json.loads((out / "run.json").read_text())
    assert run_record["status"] == "complete" and run_record["processed"][0]["frames"] == 6 and run_record["current"] is None


def noise_patch_path(workspace):
    return workspace / "noise.png"
