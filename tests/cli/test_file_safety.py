"""Nothing lost: zmask never replaces a file it did not write, outputs never replace inputs, output
files carry their suffix and are checked writable before any work, and a failed command leaves no
empty folders."""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest

from zmask.cli import main
from zmask.cli.checks import default_demo_folder, is_zmask_patch_sidecar, is_zmask_profile


def error_of(capsys, *argv: str) -> str:
    """Run ``zmask argv``; it must fail with exit code 2 and one line on stderr, which is returned."""
    code = main(list(argv))
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.fixture
def image(assets, tmp_path):
    """A CamVid image in a folder of the user's, beside an unrelated results file."""
    folder = tmp_path / "photos"
    folder.mkdir()
    source = assets / "camvid" / (assets / "camvid" / "val.txt").read_text().split()[0]
    shutil.copy(source, folder / "street.png")
    (folder / "results.jsonl").write_text("the user's own notes\n")
    return folder / "street.png"


def defend(*extra: str, image, profile, out) -> list[str]:
    return ["defend", str(image), "--model", "espnet_camvid", "--profile", str(profile), "--out", str(out), "--no-progress", *extra]


# ---------------------------------------------------------------------------- defend
def test_defend_into_the_input_folder_is_refused(capsys, image, profile):
    before = {p.name: p.read_bytes() for p in image.parent.iterdir()}
    err = error_of(capsys, *defend(image=image, profile=profile, out=image.parent))
    assert "holds the input" in err
    err = error_of(capsys, *defend("--overwrite", image=image, profile=profile, out=image.parent))
    assert "outputs never replace inputs" in err
    assert {p.name: p.read_bytes() for p in image.parent.iterdir()} == before


def test_defend_into_a_folder_of_other_files_is_refused_even_with_overwrite(capsys, image, profile, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "run.json").write_text('{"mine": true}')  # a run.json, but not zmask's
    for extra in ((), ("--overwrite",)):
        err = error_of(capsys, *defend(*extra, image=image, profile=profile, out=other))
        assert "files that zmask did not write" in err and "choose a new or empty folder" in err
    assert (other / "run.json").read_text() == '{"mine": true}' and sorted(p.name for p in other.iterdir()) == ["run.json"]


def test_defend_replaces_its_own_outputs_only_with_overwrite(capsys, image, profile, tmp_path):
    out = tmp_path / "out"
    assert main(defend(image=image, profile=profile, out=out)) == 0
    first = json.loads((out / "run.json").read_text())
    assert first["status"] == "complete" and first["command"] == "defend"
    err = error_of(capsys, *defend(image=image, profile=profile, out=out))
    assert "earlier `zmask defend` run" in err and "--overwrite" in err
    assert main(defend("--overwrite", image=image, profile=profile, out=out)) == 0
    # an input inside the output folder (here: a masked image of the earlier run) is never replaced
    masked = out / "masked" / "street.png"
    content = masked.read_bytes()
    err = error_of(capsys, "defend", str(masked), "--model", "espnet_camvid", "--profile", str(profile), "--out", str(out), "--overwrite")
    assert "outputs never replace inputs" in err and masked.read_bytes() == content


def test_a_failed_defend_leaves_no_folder(capsys, image, tmp_path):
    out = tmp_path / "deep" / "out"
    error_of(capsys, *defend(image=image, profile=tmp_path / "missing.safetensors", out=out))
    error_of(capsys, "defend", str(tmp_path / "missing.png"), "--model", "espnet_camvid", "--out", str(out))
    assert not (tmp_path / "deep").exists()


# ---------------------------------------------------------------------------- attack
def test_attack_never_replaces_an_unrelated_file(capsys, tmp_path):
    photo, notes = tmp_path / "photo.png", tmp_path / "photo.json"
    notes.write_text('{"camera": "mine"}')
    base = ["attack", "--model", "espnet_camvid", "--noise"]
    err = error_of(capsys, *base, "--out", str(photo), "--overwrite")
    assert f"sidecar {notes} exists and was not written by zmask" in err
    assert notes.read_text() == '{"camera": "mine"}' and not photo.exists()
    notes.unlink()
    photo.write_bytes(b"the user's photo")
    for extra in ((), ("--overwrite",)):
        err = error_of(capsys, *base, "--out", str(photo), *extra)
        assert "is not a patch PNG" in err and "written by zmask" in err
    assert photo.read_bytes() == b"the user's photo"


def test_attack_replaces_its_own_patch_only_with_overwrite(capsys, tmp_path):
    patch = tmp_path / "noise.png"
    base = ["attack", "--model", "espnet_camvid", "--noise", "--out", str(patch)]
    assert main(base) == 0 and is_zmask_patch_sidecar(patch.with_suffix(".json"))
    assert json.loads(patch.with_suffix(".json").read_text())["written_by"].startswith("zmask")
    assert "give --overwrite" in error_of(capsys, *base, "--seed", "1")
    assert main([*base, "--seed", "1", "--overwrite"]) == 0
    assert json.loads(patch.with_suffix(".json").read_text())["seed"] == 1
    assert "outputs never replace inputs" in error_of(capsys, *base, "--resume", str(patch), "--overwrite")
    assert "must end with .png" in error_of(capsys, "attack", "--model", "espnet_camvid", "--noise", "--out", str(tmp_path / "p.jpg"))


# ---------------------------------------------------------------------------- fit
@pytest.mark.parametrize("name, message", [
    ("notes.txt", "must end with .safetensors"),
    ("patch.png", "must end with .safetensors"),
    ("other.safetensors", "is not a profile written by zmask"),
])
def test_fit_out_is_checked_before_any_work(capsys, tmp_path, noise_patch, name, message):
    target = tmp_path / name
    target.write_bytes(b"the user's file")
    started = time.perf_counter()
    err = error_of(capsys, "fit", "--model", "espnet_camvid", "--patches", str(noise_patch), "--out", str(target), "--overwrite")
    assert message in err and time.perf_counter() - started < 30
    assert target.read_bytes() == b"the user's file"


def test_fit_out_on_an_unwritable_place_fails_at_once(capsys, noise_patch, tmp_path):
    for target in ("/proc/zmask-profile.safetensors", "/proc/self/zmask/p.safetensors", str(tmp_path / "file.txt" / "p.safetensors")):
        (tmp_path / "file.txt").write_text("a file, not a folder")
        started = time.perf_counter()
        err = error_of(capsys, "fit", "--model", "espnet_camvid", "--patches", str(noise_patch), "--out", target)
        assert "cannot be written" in err or "not a writable folder" in err, err
        assert time.perf_counter() - started < 5  # no model is built, no image read


def test_fit_out_over_its_own_profile_needs_overwrite(capsys, profile, noise_patch, tmp_path):
    copy = tmp_path / "espnet.safetensors"
    shutil.copy(profile, copy)
    assert is_zmask_profile(copy) and not is_zmask_profile(noise_patch)
    err = error_of(capsys, "fit", "--model", "espnet_camvid", "--patches", str(noise_patch), "--out", str(copy))
    assert "give --overwrite to replace it" in err
    assert "never replace inputs" in error_of(capsys, "fit", "--model", "espnet_camvid", "--patches", str(copy), "--out", str(copy),
                                              "--overwrite")


# ---------------------------------------------------------------------------- evaluate / demo
def test_evaluate_on_an_existing_report_needs_overwrite(capsys, profile, noise_patch, tmp_path):
    report = tmp_path / "report"
    report.mkdir()
    (report / "run.json").write_text(json.dumps({"command": "evaluate", "zmask_version": "0.1.0"}))
    (report / "summary.md").write_text("an earlier report")
    base = ["evaluate", "--model", "espnet_camvid", "--profile", str(profile), "--patch", f"L={noise_patch}", "--out", str(report)]
    assert "earlier `zmask evaluate` run" in error_of(capsys, *base)
    assert (report / "summary.md").read_text() == "an earlier report"
    (report / "run.json").unlink()
    assert "did not write" in error_of(capsys, *base, "--overwrite")
    inside = report / "L.png"
    shutil.copy(noise_patch, inside)
    assert "holds the input" in error_of(capsys, "evaluate", "--model", "espnet_camvid", "--patch", f"L={inside}", "--out", str(report))


def test_demo_writes_outside_the_working_folder_by_default(monkeypatch, tmp_path):
    monkeypatch.setenv("ZMASK_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    folder = default_demo_folder()
    assert folder.parent == tmp_path / "cache" / "demo" and not folder.exists()
    folder.mkdir(parents=True)
    assert default_demo_folder() != folder  # a new folder for every run


# ---------------------------------------------------------------------------- file modes
def test_outputs_have_the_modes_of_the_umask(capsys, tmp_path):
    previous = os.umask(0o022)
    try:
        patch = tmp_path / "p.png"
        assert main(["attack", "--model", "espnet_camvid", "--noise", "--out", str(patch)]) == 0
        assert patch.stat().st_mode & 0o777 == 0o644 and patch.with_suffix(".json").stat().st_mode & 0o777 == 0o644
    finally:
        os.umask(previous)


def test_fit_on_a_full_disk_keeps_the_old_profile(capsys, monkeypatch, profile, noise_patch, tmp_path):
    """The profile is written to a temporary file and renamed: a full disk mid-write is one line and
    the earlier profile stays as it was (the fit itself is replaced by the fixture's profile here)."""
    from pathlib import Path

    import zmask.evaluation
    from zmask.defense import ZMask
    from zmask.models import get_preset

    report = json.loads((Path(str(profile) + ".run") / "run.json").read_text())["report"]
    monkeypatch.setattr(zmask.evaluation, "fit_zmask",
                        lambda model, *args, **kwargs: (ZMask.load(profile, get_preset("espnet_camvid").build(True)), report))
    old = tmp_path / "old.safetensors"
    shutil.copy(profile, old)
    content = old.read_bytes()

    def full_disk(tensors, path, metadata=None):  # the safetensors writer runs out of space mid-file
        Path(path).write_bytes(b"part of a profile")
        raise OSError(28, "No space left on device")

    import zmask.core.profile

    monkeypatch.setattr(zmask.core.profile, "save_file", full_disk)
    argv = ["fit", "--model", "espnet_camvid", "--patches", str(noise_patch), "--out", str(old), "--overwrite", "--no-progress"]
    err = error_of(capsys, *argv)
    assert f"cannot write {old}: no space left on the device; the previous file is unchanged" in err
    assert old.read_bytes() == content and sorted(p.name for p in tmp_path.iterdir()) == ["old.safetensors"]
