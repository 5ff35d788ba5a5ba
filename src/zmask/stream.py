"""Z-Mask over a stream of frames (a video, a camera, a folder of frames).

``defend_stream`` runs the defense frame by frame (in batches of consecutive frames of one size)
and yields one ``FrameResult`` per frame, in order. An optional ``TemporalFlag`` rule turns the
per-frame decision (Eq. 4: score > lambda0) into a hysteresis over consecutive frames, so that a
patch seen for a few frames is masked for a few more, and a single spurious detection can be
ignored. ``defend_video`` does this for a file or folder and writes the defended video, a JSON
line per frame, and returns a summary.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .data.video import VideoWriter, open_frames
from .defense import ZMask
from .errors import ZMaskError

logger = logging.getLogger(__name__)

Prepare = Callable[[torch.Tensor], torch.Tensor]
Render = Callable[[torch.Tensor, Any], torch.Tensor]


@dataclass(frozen=True)
class TemporalFlag:
    """A hysteresis rule over the per-frame flag; the defaults leave the per-frame decision unchanged.

    With raw flag r_t (score > lambda0 on frame t), the rule keeps an alarm that is off at the start:

    * while the alarm is off, it switches on at frame t when r_t and the ``on_frames - 1`` frames
      before it are all raw-flagged (``on_frames`` consecutive raw flags; 1 = at once);
    * while it is on, a raw-flagged frame keeps it on; after the last raw-flagged frame it stays on
      for ``off_frames`` more frames, then switches off (a raw flag in that time re-arms it).

    A frame is flagged (masked and re-processed) exactly when the alarm is on after seeing it. So
    ``on_frames=1, off_frames=0`` gives the raw flag, ``on_frames=k`` delays every alarm by k - 1
    frames and ignores shorter bursts, and ``off_frames=m`` masks m frames past each burst. The
    rule is causal: it needs no future frame.
    """

    on_frames: int = 1
    off_frames: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.on_frames, int) or isinstance(self.on_frames, bool) or self.on_frames < 1:
            raise ZMaskError(f"on_frames must be an integer >= 1, got {self.on_frames!r}")
        if not isinstance(self.off_frames, int) or isinstance(self.off_frames, bool) or self.off_frames < 0:
            raise ZMaskError(f"off_frames must be an integer >= 0, got {self.off_frames!r}")

    def tracker(self) -> TemporalState:
        """A fresh state (alarm off) for one stream."""
        return TemporalState(self)

    def apply(self, raw_flags: Iterable[bool]) -> list[bool]:
        """The flags after the rule, for a whole sequence of raw flags."""
        state = self.tracker()
        return [state.step(bool(flag)) for flag in raw_flags]


class TemporalState:
    """The running state of a ``TemporalFlag`` over one stream; ``step`` takes frames in order."""

    def __init__(self, rule: TemporalFlag) -> None:
        self.rule = rule
        self.run = 0  # consecutive raw-flagged frames ending at the last frame
        self.quiet = 0  # frames since the last raw-flagged frame while the alarm is on
        self.active = False

    def step(self, raw: bool) -> bool:
        """Take the next frame's raw flag; returns whether that frame is flagged."""
        self.run = self.run + 1 if raw else 0
        if raw and (self.active or self.run >= self.rule.on_frames):
            self.active, self.quiet = True, 0
        elif self.active:
            self.quiet += 1
            self.active = self.quiet <= self.rule.off_frames
        return self.active


@dataclass
class FrameResult:
    """The defense's result on one frame.

    ``output`` is the model output for this frame in batch-of-one form (what the model returns for
    a 1 x 3 x H x W input: a 1 x ... tensor, a one-item list, or a dict/tuple of those), computed
    on ``masked`` when ``flagged``. ``score`` is d, ``raw_flagged`` the per-frame decision
    d > lambda0, ``flagged`` the decision after the temporal rule. ``keep_mask`` (1 x H x W, 1 =
    keep) is all ones when not flagged; ``masked`` (3 x H x W) is the model input after masking
    (the prepared frame itself when not flagged). Tensors are on the defense's device.
    """

    index: int
    output: Any
    score: float
    raw_flagged: bool
    flagged: bool
    keep_mask: torch.Tensor
    masked: torch.Tensor

    @property
    def masked_fraction(self) -> float:
        """The fraction of the frame's pixels that were masked."""
        return float(1.0 - self.keep_mask.float().mean())


def split_output(output: Any, count: int) -> list[Any]:
    """A batched model output as ``count`` outputs in batch-of-one form.

    Tensors are split along the first dimension, lists are read as one item per image (torchvision
    detection), and dicts and tuples are split item by item, as ``zmask.defense.merge_outputs``
    reads them.
    """
    if isinstance(output, torch.Tensor):
        if output.dim() == 0 or output.shape[0] != count:
            raise ZMaskError(f"the model output has shape {tuple(output.shape)}, expected a batch of {count} first")
        return list(output.split(1))
    if isinstance(output, list):
        if len(output) != count:
            raise ZMaskError(f"the model returned a list of {len(output)} items for a batch of {count}")
        return [[item] for item in output]
    if isinstance(output, dict):
        parts = {key: split_output(value, count) for key, value in output.items()}
        return [{key: value[i] for key, value in parts.items()} for i in range(count)]
    if isinstance(output, tuple):
        columns = [split_output(value, count) for value in output]
        make = (lambda items: type(output)(*items)) if hasattr(output, "_fields") else tuple
        return [make([column[i] for column in columns]) for i in range(count)]
    raise ZMaskError(f"cannot split model outputs of type {type(output).__name__} by frame; return a tensor, list, tuple or dict")


def _device_of(defense: ZMask) -> torch.device:
    for tensor in (*defense.model.parameters(), *defense.model.buffers(), *defense.parameters()):
        return tensor.device
    return torch.device("cpu")


@torch.no_grad()
def _defend_batch(defense: ZMask, batch: torch.Tensor, start: int, state: TemporalState) -> list[FrameResult]:
    """Defend consecutive frames; frames the temporal rule flips get their own re-computation."""
    count = batch.shape[0]
    result = defense(batch)
    detection = result.detection
    raw = detection.flagged.tolist()
    flagged = [state.step(flag) for flag in raw]
    outputs = split_output(result.output, count)
    keep = list(detection.keep_mask)
    turned_on = [i for i in range(count) if flagged[i] and not raw[i]]
    if turned_on:  # flagged by the rule only: mask with the frame's own keep-mask, gating off
        forced = defense(batch[turned_on], gate=False)
        for i, output, mask in zip(turned_on, split_output(forced.output, len(turned_on)), forced.detection.keep_mask):
            outputs[i], keep[i] = output, mask
    turned_off = [i for i in range(count) if raw[i] and not flagged[i]]
    if turned_off:  # raw-flagged but not yet alarmed: the output of the unmasked frame
        clean = defense.model(batch[turned_off])
        for i, output in zip(turned_off, split_output(clean, len(turned_off))):
            outputs[i], keep[i] = output, torch.ones_like(keep[i])
    keep_masks = torch.stack(keep)
    masked = defense.apply_mask(batch, keep_masks)
    scores = detection.score.tolist()
    return [FrameResult(start + i, outputs[i], scores[i], raw[i], flagged[i], keep_masks[i], masked[i]) for i in range(count)]


def defend_stream(
    defense: ZMask,
    frames: Iterable[torch.Tensor],
    batch_size: int = 1,
    temporal: TemporalFlag | None = None,
    prepare: Prepare | None = None,
) -> Iterator[FrameResult]:
    """Defend every frame of ``frames`` (3 x H x W tensors in [0, 1]) and yield a ``FrameResult`` each, in order.

    ``prepare`` maps each frame to the model input (e.g. resize, letterbox); the results are in
    that prepared space. Up to ``batch_size`` consecutive frames of one size run as one batch
    through a reused input buffer on the defense's device (a size change starts a new batch).
    ``temporal`` (default: none) smooths the flag over frames, see ``TemporalFlag``; a frame it
    flags that the per-frame rule did not is masked with its own keep-mask (``gate=False``), and
    one it un-flags keeps the output of the unmasked frame. Without it, the results are those of
    ``defense`` on each frame. Runs without gradients; put the model in eval mode first.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ZMaskError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    state = (temporal or TemporalFlag()).tracker()
    device = _device_of(defense)
    buffer: torch.Tensor | None = None
    pending: list[torch.Tensor] = []
    start = 0

    def run() -> list[FrameResult]:
        nonlocal buffer, start
        shape = (batch_size, *pending[0].shape)
        if buffer is None or tuple(buffer.shape) != shape:
            buffer = torch.empty(shape, dtype=torch.float32, device=device)
        for slot, frame in zip(buffer, pending):
            slot.copy_(frame)
        results = _defend_batch(defense, buffer[: len(pending)], start, state)
        start += len(pending)
        pending.clear()
        return results

    for number, frame in enumerate(frames):
        image = prepare(frame) if prepare is not None else frame
        if not isinstance(image, torch.Tensor) or image.dim() != 3:
            shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
            raise ZMaskError(f"frame {number} must be a C x H x W tensor{' after prepare' if prepare else ''}, got {shape}")
        if pending and image.shape != pending[0].shape:
            yield from run()
        pending.append(image)
        if len(pending) == batch_size:
            yield from run()
    if pending:
        yield from run()


FrameCallback = Callable[[dict[str, Any], FrameResult], None]


def defend_video(
    defense: ZMask,
    source: str | Path,
    out_folder: str | Path,
    *,
    batch_size: int = 1,
    temporal: TemporalFlag | None = None,
    prepare: Prepare | None = None,
    render: Render | None = None,
    fps: float | None = None,
    codec: str | None = None,
    limit: int | None = None,
    progress: bool = True,
    video_name: str = "defended.mp4",
    on_frame: FrameCallback | None = None,
    threads: int = 1,
) -> dict[str, Any]:
    """Defend a video file or a folder of frames; write the defended video (``video_name``, default
    ``defended.mp4``) and ``frames.jsonl`` to ``out_folder``.

    The video shows, at the source's frame rate (or ``fps``), ``render(masked_frame, output)`` for
    each frame (default: the masked frame itself, in the prepared space), so a caller can draw the
    prediction over it; ``render`` returns a 3 x H x W tensor in [0, 1], one size for all frames.
    It is a fragmented MP4: if the process is killed, the file still plays up to its last second.
    ``frames.jsonl`` holds one line per frame, written and flushed before the frame goes into the
    video (so every frame in the video has its line): index, score, flagged, raw_flagged,
    masked_fraction, corrupt (FFmpeg decoded the frame with errors, or packets before it could not
    be decoded) and, for such a frame, ``problem``. With ``on_frame``, each line goes to
    ``on_frame(record, result)`` instead and no ``frames.jsonl`` is written. ``limit`` defends only
    the first frames; ``threads``: decoder and encoder threads (default 1, leaving the cores to the
    model). Returns a summary: frames, flagged, raw_flagged, corrupt_frames, skipped_packets,
    read_error, seconds and frames_per_second (measured end to end, decoding and encoding
    included), frame_rate, and the paths of the files.
    """
    frames = open_frames(source, fps, threads)
    if limit is not None and limit < 1:
        raise ZMaskError(f"limit must be >= 1, got {limit}")
    out = Path(out_folder)
    out.mkdir(parents=True, exist_ok=True)
    video_path = out / video_name
    log_path = out / "frames.jsonl" if on_frame is None else None
    total = frames.count if limit is None or frames.count is None else min(frames.count, limit)
    source_frames: Iterable[torch.Tensor] = frames
    if limit is not None:
        source_frames = (frame for frame, _ in zip(frames, range(limit)))
    count = flagged = raw_flagged = corrupt = 0
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        writer = stack.enter_context(VideoWriter(video_path, frames.fps, codec, fragmented=True, threads=threads))
        log = stack.enter_context(log_path.open("w", encoding="utf-8")) if log_path is not None else None
        bar = stack.enter_context(tqdm(total=total, desc="defend", unit="frame", disable=not progress))
        for result in defend_stream(defense, source_frames, batch_size, temporal, prepare):
            problem = frames.problems.get(result.index)
            record: dict[str, Any] = {
                "index": result.index,
                "score": result.score,
                "flagged": result.flagged,
                "raw_flagged": result.raw_flagged,
                "masked_fraction": result.masked_fraction,
                "corrupt": problem is not None,
            }
            if problem is not None:
                record["problem"] = problem
            if on_frame is not None:
                on_frame(record, result)
            elif log is not None:
                log.write(json.dumps(record) + "\n")
                log.flush()
            writer.write(render(result.masked, result.output) if render is not None else result.masked)
            count += 1
            flagged += result.flagged
            raw_flagged += result.raw_flagged
            corrupt += problem is not None
            bar.set_postfix(flagged=flagged, refresh=False)
            bar.update(1)
    seconds = time.perf_counter() - started
    if count == 0:
        raise ZMaskError(f"{source} has no frames" + (f" that could be decoded ({frames.read_error or 'every packet failed'})"
                                                       if frames.skipped_packets or frames.read_error else ""))
    if corrupt or frames.skipped_packets or frames.read_error:
        logger.warning("video %s is damaged: %d of %d frames decoded with errors, %d packets skipped%s", source, corrupt, count,
                       frames.skipped_packets, f"; {frames.read_error}" if frames.read_error else "")
    logger.info("defended %s: %d of %d frames flagged in %.1f s; wrote %s", source, flagged, count, seconds, video_path)
    return {
        "frames": count,
        "flagged": flagged,
        "raw_flagged": raw_flagged,
        "corrupt_frames": corrupt,
        "skipped_packets": frames.skipped_packets,
        "read_error": frames.read_error,
        "seconds": seconds,
        "frames_per_second": count / seconds if seconds > 0 else float("inf"),
        "frame_rate": frames.fps,
        "video": str(video_path),
        "log": str(log_path) if log_path is not None else None,
    }
