"""Video and stream defense on the toy network: frame I/O, per-frame equivalence, the temporal rule, errors."""

from __future__ import annotations

import json
import sys
from collections import namedtuple

import pytest
import torch
from PIL import Image

from zmask import ZMask, ZMaskError
from zmask.data.video import FolderFrames, VideoFrames, VideoWriter, open_frames, write_video
from zmask.stream import TemporalFlag, defend_stream, defend_video, split_output

from .toy import fitted_toy_defense

av = pytest.importorskip("av")

# C: clean frame, P: frame with a high-contrast square.
PATTERN = "CCCPPPPCCPCC"


def make_frames(pattern: str = PATTERN, height: int = 64, width: int = 96, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    frames = []
    for index, kind in enumerate(pattern):
        frame = torch.rand(3, height, width, generator=generator) * 0.2 + 0.4
        if kind == "P":
            top, left = 8 + index, 10 + 3 * index
            frame[:, top : top + 24, left : left + 24] = (torch.rand(3, 24, 24, generator=generator) > 0.5).float()
        frames.append(frame)
    return frames


@pytest.fixture(scope="module")
def fitted() -> ZMask:
    return fitted_toy_defense()


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    assert write_video(path, make_frames(), fps=10) == len(PATTERN)
    return str(path)


# ---------------------------------------------------------------------------- frame I/O
def test_video_round_trip(video):
    frames = open_frames(video)
    assert isinstance(frames, VideoFrames) and frames.fps == pytest.approx(10) and frames.count == len(PATTERN)
    decoded = list(frames)
    assert len(decoded) == len(PATTERN)
    for original, frame in zip(make_frames(), decoded):
        assert frame.shape == (3, 64, 96) and frame.dtype == torch.float32 and frame.is_contiguous()
        assert 0 <= float(frame.min()) and float(frame.max()) <= 1
        blur = lambda image: torch.nn.functional.avg_pool2d(image[None], 4)  # noqa: E731 - codecs keep coarse content
        assert (blur(frame) - blur(original)).abs().mean() < 0.03
    assert len(list(frames)) == len(PATTERN), "a second iteration decodes the video again"


def test_odd_sizes_are_padded_and_mpeg4_works(tmp_path):
    frames = [torch.full((3, 33, 47), 0.5) for _ in range(3)]
    write_video(tmp_path / "odd.mp4", frames, fps=29.97, codec="mpeg4")
    decoded = list(open_frames(tmp_path / "odd.mp4"))
    assert len(decoded) == 3 and decoded[0].shape == (3, 34, 48)
    assert (decoded[0] - 0.5).abs().max() < 0.03


def test_folder_frames_in_natural_order(tmp_path):
    frames = make_frames("CPCCCCCCCCPC")
    for index, frame in enumerate(frames):
        array = (frame * 255).round().byte().permute(1, 2, 0).numpy()
        Image.fromarray(array).save(tmp_path / f"frame{index}.png")
    (tmp_path / "notes.txt").write_text("not a frame")
    source = open_frames(tmp_path, fps=5)
    assert isinstance(source, FolderFrames) and source.fps == 5 and source.count == 12
    for original, frame in zip(frames, source):
        torch.testing.assert_close(frame, (original * 255).round() / 255, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------- temporal rule
def test_temporal_rule_on_flags():
    raw = [False, True, True, True, False, False, False, True, False, True, True, False]
    assert TemporalFlag().apply(raw) == raw
    assert TemporalFlag(on_frames=2).apply(raw) == [False, False, True, True, False, False, False, False, False, False, True, False]
    assert TemporalFlag(off_frames=2).apply(raw) == [False, True, True, True, True, True, False, True, True, True, True, True]
    # on: after 2 consecutive raw flags; once on, a raw flag within the hold re-arms it.
    assert TemporalFlag(on_frames=2, off_frames=2).apply(raw) == [False, False, True, True, True, True, False, False, False, False, True, True]
    assert TemporalFlag(on_frames=3, off_frames=1).apply([True, True, False, True, True, True, False, True, False, False]) == [
        False, False, False, False, False, True, True, True, True, False
    ]
    for bad in ({"on_frames": 0}, {"off_frames": -1}, {"on_frames": 1.5}):
        with pytest.raises(ZMaskError):
            TemporalFlag(**bad)


# ---------------------------------------------------------------------------- defend_stream
def test_defaults_equal_the_per_frame_defense(fitted):
    frames = make_frames()
    results = list(defend_stream(fitted, frames))
    assert [r.index for r in results] == list(range(len(frames)))
    assert [r.raw_flagged for r in results] == [kind == "P" for kind in PATTERN]
    for frame, result in zip(frames, results):
        with torch.no_grad():
            reference = fitted(frame[None])
        assert result.score == float(reference.detection.score[0])
        assert result.flagged == result.raw_flagged == bool(reference.detection.flagged[0])
        assert torch.equal(result.output, reference.output)
        assert torch.equal(result.keep_mask, reference.detection.keep_mask[0])
        assert torch.equal(result.masked, fitted.apply_mask(frame[None], reference.detection.keep_mask)[0])
        assert (result.masked_fraction > 0) == result.flagged
    batched = list(defend_stream(fitted, frames, batch_size=5))
    assert [r.index for r in batched] == list(range(len(frames)))
    assert [r.flagged for r in batched] == [r.flagged for r in results]
    torch.testing.assert_close(torch.tensor([r.score for r in batched]), torch.tensor([r.score for r in results]))


def test_prepare_and_size_changes(fitted):
    small, large = make_frames("CPC"), make_frames("PCP", 96, 128, seed=3)
    frames = [small[0], small[1], large[0], large[1], large[2], small[2]]
    results = list(defend_stream(fitted, frames, batch_size=2))
    assert [r.index for r in results] == list(range(6))
    assert [r.masked.shape[-1] for r in results] == [96, 96, 128, 128, 128, 96]
    for frame, result in zip(frames, results):
        assert result.score == pytest.approx(float(fitted.detect(frame[None]).score[0].detach()), rel=1e-4, abs=1e-6)
    halve = lambda frame: torch.nn.functional.interpolate(frame[None], scale_factor=0.5)[0]  # noqa: E731
    prepared = list(defend_stream(fitted, small, prepare=halve))
    assert prepared[0].masked.shape == (3, 32, 48) and prepared[0].keep_mask.shape == (1, 32, 48)
    with pytest.raises(ZMaskError, match="frame 0 must be a C x H x W tensor"):
        list(defend_stream(fitted, [torch.rand(1, 3, 8, 8)]))
    with pytest.raises(ZMaskError, match="batch_size"):
        list(defend_stream(fitted, small, batch_size=0))


def test_temporal_rule_in_the_stream(fitted):
    frames = make_frames()
    rule = TemporalFlag(on_frames=2, off_frames=2)
    results = list(defend_stream(fitted, frames, batch_size=4, temporal=rule))
    raw = [r.raw_flagged for r in results]
    assert raw == [kind == "P" for kind in PATTERN]
    assert [r.flagged for r in results] == rule.apply(raw)
    model = fitted.model
    with torch.no_grad():
        for frame, result in zip(frames, results):
            if result.flagged and not result.raw_flagged:  # masked by the rule alone: own mask, gating off
                keep = fitted.detect(frame[None], gate=False).keep_mask
                torch.testing.assert_close(result.keep_mask, keep[0])
                assert result.masked_fraction > 0
                torch.testing.assert_close(result.output, model(fitted.apply_mask(frame[None], keep)), rtol=1e-4, atol=1e-5)
            elif result.raw_flagged and not result.flagged:  # alarm not raised yet: the unmasked output
                assert torch.all(result.keep_mask == 1) and torch.equal(result.masked, frame)
                torch.testing.assert_close(result.output, model(frame[None]), rtol=1e-4, atol=1e-5)
    assert any(r.flagged and not r.raw_flagged for r in results) and any(r.raw_flagged and not r.flagged for r in results)


def test_split_output():
    Pair = namedtuple("Pair", "a b")
    tensor = torch.arange(6.0).view(3, 2)
    assert [t.shape for t in split_output(tensor, 3)] == [(1, 2)] * 3
    assert split_output([{"boxes": 1}, {"boxes": 2}], 2) == [[{"boxes": 1}], [{"boxes": 2}]]
    parts = split_output({"x": tensor, "y": (tensor, tensor)}, 3)
    assert torch.equal(parts[2]["y"][1], tensor[2:])
    assert isinstance(split_output(Pair(tensor, tensor), 3)[0], Pair)
    with pytest.raises(ZMaskError, match="batch of 2"):
        split_output(tensor, 2)
    with pytest.raises(ZMaskError, match="cannot split"):
        split_output("text", 1)


# ---------------------------------------------------------------------------- defend_video
def test_defend_video(fitted, video, tmp_path):
    seen = []

    def render(frame, output):
        seen.append(tuple(output.shape))
        drawn = frame.clone()
        drawn[:, :2] = 1.0  # a white bar standing for an overlay
        return drawn

    summary = defend_video(fitted, video, tmp_path / "out", render=render, progress=False)
    assert summary["frames"] == len(PATTERN) and summary["frame_rate"] == pytest.approx(10)
    assert summary["frames_per_second"] > 0 and seen == [(1, 32, 8, 12)] * len(PATTERN)
    lines = [json.loads(line) for line in (tmp_path / "out" / "frames.jsonl").read_text().splitlines()]
    assert [line["index"] for line in lines] == list(range(len(PATTERN)))
    assert set(lines[0]) == {"index", "score", "flagged", "raw_flagged", "masked_fraction", "corrupt"}
    assert not any(line["corrupt"] for line in lines) and summary["corrupt_frames"] == summary["skipped_packets"] == 0
    assert summary["flagged"] == sum(line["flagged"] for line in lines) and 0 < summary["flagged"] < len(PATTERN)
    assert all((line["masked_fraction"] > 0) == line["flagged"] for line in lines)
    written = open_frames(summary["video"])
    assert written.fps == pytest.approx(10)
    decoded = list(written)
    assert len(decoded) == len(PATTERN) and decoded[0].shape == (3, 64, 96)
    assert float(decoded[0][:, :2].mean()) > 0.9

    held = defend_video(fitted, video, tmp_path / "held", temporal=TemporalFlag(off_frames=1), limit=5, progress=False)
    assert held["frames"] == 5 and len((tmp_path / "held" / "frames.jsonl").read_text().splitlines()) == 5
    assert len(list(open_frames(held["video"]))) == 5


def test_defend_a_folder_of_frames(fitted, tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    for index, frame in enumerate(make_frames()):
        Image.fromarray((frame * 255).round().byte().permute(1, 2, 0).numpy()).save(folder / f"{index:03d}.png")
    summary = defend_video(fitted, folder, tmp_path / "out", fps=4, batch_size=3, progress=False)
    assert summary["frames"] == len(PATTERN) and summary["frame_rate"] == 4
    assert summary["raw_flagged"] == PATTERN.count("P")
    assert len(list(open_frames(summary["video"]))) == len(PATTERN)


# ---------------------------------------------------------------------------- errors
def test_clear_errors(tmp_path, video, monkeypatch):
    with pytest.raises(ZMaskError, match="video .*missing.mp4 does not exist"):
        open_frames(tmp_path / "missing.mp4")
    (tmp_path / "corrupt.mp4").write_bytes(b"this is not a video" * 50)
    with pytest.raises(ZMaskError, match="cannot decode video .*corrupt.mp4"):
        open_frames(tmp_path / "corrupt.mp4")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ZMaskError, match="no frame images"):
        open_frames(tmp_path / "empty")
    Image.new("RGB", (8200, 2)).save(tmp_path / "empty" / "wide.png")
    with pytest.raises(ZMaskError, match="8192 pixels a side"):
        list(open_frames(tmp_path / "empty"))
    with pytest.raises(ZMaskError, match="8192 pixels a side"):
        write_video(tmp_path / "big.mp4", [torch.zeros(3, 2, 8200)], fps=10)
    with pytest.raises(ZMaskError, match="must be a 3 x H x W tensor"):
        write_video(tmp_path / "gray.mp4", [torch.zeros(1, 8, 8)], fps=10)
    with pytest.raises(ZMaskError, match="frame rate"):
        write_video(tmp_path / "slow.mp4", [torch.zeros(3, 8, 8)], fps=0)
    with VideoWriter(tmp_path / "sizes.mp4", fps=10) as writer:
        writer.write(torch.zeros(3, 8, 8))
        with pytest.raises(ZMaskError, match="is 10x8, the video 8x8"):
            writer.write(torch.zeros(3, 8, 10))
    monkeypatch.setitem(sys.modules, "av", None)
    with pytest.raises(ZMaskError, match=r"install zmask\[video\]"):
        open_frames(video)
    with pytest.raises(ZMaskError, match=r"install zmask\[video\]"):
        VideoWriter(tmp_path / "x.mp4", fps=10)


# ---------------------------------------------------------------------------- damaged and killed videos
def _damaged_copy(video: str, path, offset_fraction: float = 0.5, length: int = 400):
    data = bytearray(open(video, "rb").read())
    start = int(len(data) * offset_fraction)
    for index in range(start, min(len(data), start + length)):
        data[index] ^= 0x5A
    path.write_bytes(bytes(data))
    return path


def test_damaged_video_frames_are_reported(fitted, tmp_path):
    """Bytes damaged mid-file: the frames FFmpeg decodes with errors (or after skipped packets) are
    marked per frame and counted in the summary, not defended in silence."""
    frames = [torch.rand(3, 64, 96, generator=torch.Generator().manual_seed(i)) for i in range(24)]  # noise: large frames
    clean = tmp_path / "clean.mp4"
    write_video(clean, frames, fps=10, codec="libx264" if "libx264" in av.codecs_available else "mpeg4")
    damaged = _damaged_copy(str(clean), tmp_path / "damaged.mp4")
    source = open_frames(damaged)
    decoded = list(source)
    assert source.problems and set(source.problems) <= set(range(len(decoded)))
    assert all("error" in text or "skipped" in text for text in source.problems.values())
    assert list(open_frames(clean)) and not open_frames(clean).problems
    summary = defend_video(fitted, damaged, tmp_path / "out", progress=False)
    lines = [json.loads(line) for line in (tmp_path / "out" / "frames.jsonl").read_text().splitlines()]
    marked = [line["index"] for line in lines if line["corrupt"]]
    assert marked == sorted(source.problems) and summary["corrupt_frames"] == len(marked) > 0
    assert all(line["problem"] for line in lines if line["corrupt"]) and all("problem" not in line for line in lines if not line["corrupt"])


WRITER = """
import sys, time, torch
from zmask.data.video import VideoWriter
with VideoWriter(sys.argv[1], fps=10, fragmented=True) as writer:
    for index in range(100000):
        writer.write(torch.rand(3, 64, 96, generator=torch.Generator().manual_seed(index)))
        print(index, flush=True)
        time.sleep(0.01)
"""


def test_fragmented_video_plays_after_a_kill(tmp_path):
    """A fragmented MP4 whose writer is killed (SIGKILL) mid-stream decodes up to its last fragment."""
    import subprocess

    path = tmp_path / "killed.mp4"
    process = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True)
    written = 0
    for line in process.stdout:
        written = int(line) + 1
        if written >= 35:  # more than 3 fragments of 1 s at 10 frames/s
            break
    process.kill()
    process.wait(timeout=30)
    decoded = list(open_frames(path))
    assert 10 <= len(decoded) <= written
    assert decoded[0].shape == (3, 64, 96)
