"""Frames in and out: a video file or a folder of frame images, read as 3 x H x W tensors in [0, 1].

Video decoding and encoding use PyAV (``pip install 'zmask[video]'``), imported only when a video
is actually opened, so the rest of zmask works without it. A folder of images needs only Pillow.
Every failure is a ``ZMaskError`` that names the file.

Decoding and encoding use one thread each by default, so that they do not compete with the model
for cores. A packet that cannot be decoded is skipped and a frame that FFmpeg decoded with errors
(concealed, corrupt) is still returned; both are reported per frame (``VideoFrames.problems``) so
that a damaged file is never defended in silence. ``VideoWriter(fragmented=True)`` writes an MP4
that stays playable up to its last second when the process is killed.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable, Iterator
from fractions import Fraction
from pathlib import Path
from types import ModuleType, TracebackType
from typing import Any

import numpy as np
import torch

from ..errors import ZMaskError
from .folder import IMAGE_SUFFIXES
from .io import read_image

logger = logging.getLogger(__name__)

# Refuse frames larger than this many pixels on a side (video or image), read or written.
MAX_SIDE = 8192
# Frame rate of a folder of images, which records none.
DEFAULT_FPS = 25.0
# Encoders tried in order when none is named: H.264 where the PyAV build has it, else MPEG-4 Part 2.
DEFAULT_CODECS = ("libx264", "mpeg4")
# Muxer options of a fragmented MP4: a header without sample tables, then self-contained fragments of
# at most FRAGMENT_SECONDS written (and flushed) as they complete, so a killed writer leaves a file
# that plays up to its last complete fragment.
FRAGMENT_SECONDS = 1.0
FRAGMENTED_MP4 = {"movflags": "frag_keyframe+empty_moov+default_base_moof", "frag_duration": str(int(FRAGMENT_SECONDS * 1e6)),
                  "flush_packets": "1"}
MP4_SUFFIXES = (".mp4", ".m4v", ".mov")


def _import_av() -> ModuleType:
    try:
        import av
    except ImportError:
        raise ZMaskError("reading or writing video needs PyAV: install zmask[video] (pip install 'zmask[video]')") from None
    return av


def _check_side(height: int, width: int, what: str) -> None:
    if height > MAX_SIDE or width > MAX_SIDE:
        raise ZMaskError(f"{what} is {width}x{height} pixels, larger than the {MAX_SIDE} pixels a side allowed")


def _check_fps(fps: float) -> float:
    fps = float(fps)
    if not math.isfinite(fps) or not 0 < fps <= 1000:
        raise ZMaskError(f"frame rate must be in (0, 1000] frames per second, got {fps}")
    return fps


def _natural_key(path: Path) -> list[Any]:
    """Sort key comparing the digit runs of a name by value: frame2 before frame10."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", path.name)]


class VideoFrames:
    """The frames of a video file, decoded lazily on each iteration.

    ``fps`` is the stream's average frame rate (or ``fps`` if given); ``count`` the number of frames
    the container declares (``None`` when it declares none: iterate to know). The file is probed
    when the object is made, so an unreadable file fails here rather than mid-stream. ``threads``:
    decoder threads (default 1).

    Damage is reported, not hidden: during an iteration, ``problems`` maps the index of every frame
    that FFmpeg flagged as decoded with errors (corrupt data, concealment), or that follows packets
    that could not be decoded at all (and were skipped), to a description; ``skipped_packets``
    counts the latter (those at the end of the file included), and ``read_error`` says why the
    iteration stopped early when the container itself could not be read further.
    """

    def __init__(self, path: str | Path, fps: float | None = None, threads: int = 1) -> None:
        self.path = Path(path)
        self.threads = threads
        self.problems: dict[int, str] = {}
        self.skipped_packets = 0
        self.read_error: str | None = None
        if not self.path.is_file():
            raise ZMaskError(f"video {self.path} does not exist")
        av = _import_av()
        with self._open(av) as container:
            stream = container.streams.video[0]
            _check_side(stream.height, stream.width, f"video {self.path}")
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate
            self.fps = _check_fps(fps if fps is not None else float(rate) if rate else DEFAULT_FPS)
            self.count: int | None = int(stream.frames) or None
            self.size: tuple[int, int] = (int(stream.height), int(stream.width))
        if fps is None and not rate:
            logger.warning("video %s records no frame rate; using %g frames per second", self.path, self.fps)
        logger.debug("opened video %s: %dx%d, %g frames/s, %s frames", self.path, *self.size, self.fps, self.count or "unknown")

    def _open(self, av: ModuleType) -> Any:
        try:
            container = av.open(str(self.path), mode="r")
        except (av.error.FFmpegError, OSError) as error:
            raise ZMaskError(f"cannot decode video {self.path}: {error}") from None
        if not container.streams.video:
            container.close()
            raise ZMaskError(f"cannot decode video {self.path}: it has no video stream")
        return container

    def __iter__(self) -> Iterator[torch.Tensor]:
        av = _import_av()
        container = self._open(av)
        self.problems, self.skipped_packets, self.read_error = {}, 0, None
        index, skipped, last_error = 0, 0, ""
        try:
            stream = container.streams.video[0]
            stream.codec_context.thread_count = self.threads
            packets = container.demux(stream)
            while True:
                try:
                    packet = next(packets)
                except StopIteration:
                    break
                except (av.error.FFmpegError, OSError) as error:  # the container itself is damaged here: stop
                    self.read_error = f"cannot read the file past frame {index}: {error}"
                    logger.warning("video %s: %s", self.path, self.read_error)
                    break
                try:
                    decoded = packet.decode()
                except (av.error.FFmpegError, OSError) as error:
                    skipped, last_error = skipped + 1, str(error)
                    self.skipped_packets += 1
                    continue
                for frame in decoded:
                    notes = []
                    if skipped:
                        notes.append(f"{skipped} packet{'s' if skipped > 1 else ''} before this frame could not be decoded "
                                     f"and {'were' if skipped > 1 else 'was'} skipped ({last_error})")
                        skipped = 0
                    if getattr(frame, "is_corrupt", False):
                        notes.append("FFmpeg decoded this frame with errors (corrupt data, concealed)")
                    if notes:
                        self.problems[index] = "; ".join(notes)
                        logger.warning("video %s, frame %d: %s", self.path, index, self.problems[index])
                    _check_side(frame.height, frame.width, f"frame {index} of video {self.path}")
                    yield _to_tensor(frame.to_ndarray(format="rgb24"))
                    index += 1
            if skipped:
                logger.warning("video %s: the last %d packets could not be decoded (%s)", self.path, skipped, last_error)
        finally:
            container.close()

    def __repr__(self) -> str:
        return f"VideoFrames({str(self.path)!r}, fps={self.fps:g}, count={self.count})"


class FolderFrames:
    """The images of a folder as frames, in natural name order (frame2 before frame10).

    Each image is read with ``zmask.data.io.read_image`` when the iteration reaches it; folders
    record no frame rate, so ``fps`` is the one given (default 25).
    """

    def __init__(self, root: str | Path, fps: float = DEFAULT_FPS) -> None:
        self.path = Path(root)
        if not self.path.is_dir():
            raise ZMaskError(f"frame folder {self.path} does not exist")
        self.paths = sorted((p for p in self.path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES), key=_natural_key)
        if not self.paths:
            raise ZMaskError(f"no frame images ({', '.join(IMAGE_SUFFIXES)}) in {self.path}")
        self.fps = _check_fps(fps)
        self.count: int | None = len(self.paths)
        self.problems: dict[int, str] = {}  # frames are images: a damaged one fails with its name
        self.skipped_packets = 0
        self.read_error: str | None = None

    def __iter__(self) -> Iterator[torch.Tensor]:
        for path in self.paths:
            image = read_image(path)
            _check_side(image.shape[1], image.shape[2], f"frame {path}")
            yield image

    def __repr__(self) -> str:
        return f"FolderFrames({str(self.path)!r}, fps={self.fps:g}, count={self.count})"


def open_frames(source: str | Path, fps: float | None = None, threads: int = 1) -> VideoFrames | FolderFrames:
    """Frames of ``source``: a folder of images, or any video file FFmpeg decodes (with ``threads``
    decoder threads).

    ``fps`` overrides the video's frame rate, or sets the folder's (default 25).
    """
    source = Path(source)
    if source.is_dir():
        return FolderFrames(source, DEFAULT_FPS if fps is None else fps)
    return VideoFrames(source, fps, threads)


def _to_tensor(array: np.ndarray) -> torch.Tensor:
    """H x W x 3 uint8 -> contiguous 3 x H x W float32 in [0, 1]."""
    return torch.from_numpy(array).permute(2, 0, 1).to(torch.float32, memory_format=torch.contiguous_format).div_(255.0)


def _to_array(frame: torch.Tensor, what: str) -> np.ndarray:
    """3 x H x W float in [0, 1] (any device) -> H x W x 3 uint8; values outside [0, 1] are clipped."""
    if not isinstance(frame, torch.Tensor) or frame.dim() != 3 or frame.shape[0] != 3:
        shape = tuple(frame.shape) if isinstance(frame, torch.Tensor) else type(frame).__name__
        raise ZMaskError(f"{what} must be a 3 x H x W tensor, got {shape}")
    _check_side(frame.shape[1], frame.shape[2], what)
    pixels = torch.nan_to_num(frame.detach().float(), nan=0.0).clamp_(0.0, 1.0).mul_(255.0).round_()
    return pixels.to(torch.uint8).permute(1, 2, 0).contiguous().cpu().numpy()


class VideoWriter:
    """Writes 3 x H x W frames in [0, 1] to a video file (mp4: H.264, else MPEG-4), one at a time.

    The stream opens on the first frame, whose size every later frame must share. 4:2:0 encoders
    need even sides, so an odd height or width is padded by repeating the last row or column.
    ``codec`` names an FFmpeg encoder; by default the first of ``DEFAULT_CODECS`` this PyAV has.
    ``threads``: encoder threads (default 1). Use as a context manager, or call ``close()``: the
    file is complete only after it, unless ``fragmented`` (MP4 only): then the file is written in
    self-contained fragments of at most ``FRAGMENT_SECONDS``, each flushed to the file as it
    completes (H.264 without look-ahead, so frames do not wait in the encoder), and a killed
    process leaves a video that plays up to its last complete fragment.
    """

    def __init__(self, path: str | Path, fps: float, codec: str | None = None, *, fragmented: bool = False, threads: int = 1) -> None:
        self._av = _import_av()
        self.path = Path(path)
        self.fps = _check_fps(fps)
        self.fragmented = fragmented
        self.threads = threads
        if fragmented and self.path.suffix.lower() not in MP4_SUFFIXES:
            raise ZMaskError(f"a fragmented video is an MP4 file ({', '.join(MP4_SUFFIXES)}); got {self.path}")
        self.codec = codec if codec is not None else self._default_codec()
        self.frames = 0
        self._container: Any = None
        self._stream: Any = None
        self._size: tuple[int, int] | None = None

    def _default_codec(self) -> str:
        for name in DEFAULT_CODECS:
            try:
                self._av.codec.Codec(name, "w")
                return name
            except Exception:  # noqa: BLE001 - PyAV raises various types for an unknown codec
                continue
        raise ZMaskError(f"this PyAV build has none of the encoders {', '.join(DEFAULT_CODECS)}; pass codec=")

    def _start(self, height: int, width: int) -> None:
        av = self._av
        rate = Fraction(self.fps).limit_denominator(1001)
        try:
            self._container = av.open(str(self.path), mode="w", options=dict(FRAGMENTED_MP4) if self.fragmented else {})
            stream = self._container.add_stream(self.codec, rate=rate)
            stream.height, stream.width = height + height % 2, width + width % 2
            stream.pix_fmt = "yuv420p"
            stream.codec_context.thread_count = self.threads
            if self.codec == "libx264":
                stream.options = {"crf": "18", "preset": "veryfast", **({"tune": "zerolatency"} if self.fragmented else {})}
            else:  # a bit rate that keeps MPEG-4 sharp at any size: ~0.3 bit per pixel
                stream.bit_rate = int(max(1_000_000, 0.3 * stream.height * stream.width * self.fps))
            self._stream = stream
        except (av.error.FFmpegError, OSError, ValueError) as error:
            self._abort()
            raise ZMaskError(f"cannot write video {self.path} with codec {self.codec}: {error}") from None
        self._size = (height, width)

    def write(self, frame: torch.Tensor) -> None:
        """Encode one frame (3 x H x W, values in [0, 1]; clipped outside)."""
        array = _to_array(frame, f"frame {self.frames} written to {self.path}")
        height, width = array.shape[:2]
        if self._size is None:
            self._start(height, width)
        elif (height, width) != self._size:
            raise ZMaskError(f"frame {self.frames} written to {self.path} is {width}x{height}, the video {self._size[1]}x{self._size[0]}")
        if height % 2 or width % 2:
            array = np.pad(array, ((0, height % 2), (0, width % 2), (0, 0)), mode="edge")
        try:
            picture = self._av.VideoFrame.from_ndarray(array, format="rgb24")
            for packet in self._stream.encode(picture):
                self._container.mux(packet)
        except (self._av.error.FFmpegError, OSError) as error:
            raise ZMaskError(f"cannot write frame {self.frames} to video {self.path}: {error}") from None
        self.frames += 1

    def close(self) -> None:
        """Flush the encoder and finish the file (nothing is written if no frame was)."""
        if self._container is None:
            return
        try:
            for packet in self._stream.encode():
                self._container.mux(packet)
        except (self._av.error.FFmpegError, OSError) as error:
            raise ZMaskError(f"cannot finish video {self.path}: {error}") from None
        finally:
            self._abort()

    def _abort(self) -> None:
        if self._container is not None:
            self._container.close()
        self._container = self._stream = None

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None) -> None:
        if kind is None:
            self.close()
        else:  # do not mask the original error with a flush failure
            try:
                self.close()
            except ZMaskError:
                pass


def write_video(path: str | Path, frames: Iterable[torch.Tensor], fps: float, codec: str | None = None) -> int:
    """Write ``frames`` (3 x H x W in [0, 1], all one size) to ``path``; returns how many were written."""
    with VideoWriter(path, fps, codec) as writer:
        for frame in frames:
            writer.write(frame)
    if writer.frames == 0:
        raise ZMaskError(f"no frames to write to {path}")
    return writer.frames
