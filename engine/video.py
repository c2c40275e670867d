"""Write rendered frames as MP4 (H.264) or GIF, atomically; probe what was written.

MP4s are H.264 / yuv420p with the index at the front (``+faststart``) and no audio track,
which is what Telegram and Discord play inline. Both writers go to a temporary file in
the target directory and ``os.replace`` it into place, so a reader never sees half a file.
"""

from __future__ import annotations

import os
import re
import subprocess
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import imageio_ffmpeg
import numpy as np
from PIL import Image

from engine.errors import EngineError
from storage.specs import MORPH_FPS

__all__ = ["VideoInfo", "encode_gif", "encode_mp4", "probe", "write_animation"]


@dataclass(frozen=True)
class VideoInfo:
    frames: int
    width: int
    height: int
    fps: float
    codec: str  # ffmpeg's decoder name: "h264", "gif", ...
    pix_fmt: str  # "yuv420p", "bgra", ...
    has_audio: bool


def _check_frames(frames: np.ndarray) -> None:
    # frames: [N, H, W, 3] uint8
    if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8:
        raise EngineError("frames must be a uint8 numpy array [N, H, W, 3]")
    if frames.ndim != 4 or frames.shape[3] != 3:
        raise EngineError(f"frames must be [N, H, W, 3], got {list(frames.shape)}")
    if frames.shape[0] < 1 or frames.shape[1] < 1 or frames.shape[2] < 1:
        raise EngineError(f"no frames to write (shape {list(frames.shape)})")


def _check_fps(fps: float) -> None:
    if not fps > 0 or fps > 120:
        raise EngineError(f"fps must be above 0 and at most 120, got {fps}")


def _atomic_write(path: str | os.PathLike[str], write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp)`` on a temporary file beside ``path``, then move it into place."""
    final = Path(path)
    if not final.parent.is_dir():
        raise EngineError(f"cannot write {final}: folder {final.parent} does not exist")
    # Same suffix as the target so tools that look at the name see the right format.
    tmp = final.with_name(f".{final.stem}.{uuid.uuid4().hex[:12]}.tmp{final.suffix}")
    try:
        write(tmp)
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    return final


def _pad_even(frames: np.ndarray) -> np.ndarray:
    # [N, H, W, 3] -> [N, H + H%2, W + W%2, 3]: yuv420p needs even sides; edge pixels repeat.
    _, h, w, _ = frames.shape
    if h % 2 == 0 and w % 2 == 0:
        return frames
    return np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")


def encode_mp4(
    frames: np.ndarray, path: str | os.PathLike[str], *, fps: float = MORPH_FPS, crf: int = 20
) -> Path:
    """Write frames [N, H, W, 3] uint8 as H.264 MP4 (yuv420p, faststart, no audio).

    Odd sides are padded to even by repeating the edge pixels (never rescaled).
    """
    _check_frames(frames)
    _check_fps(fps)
    if isinstance(crf, bool) or not isinstance(crf, int) or not 0 <= crf <= 51:
        raise EngineError(f"crf must be a whole number from 0 to 51, got {crf!r}")
    padded = _pad_even(frames)
    _, h, w, _ = padded.shape

    def write(tmp: Path) -> None:
        writer = imageio_ffmpeg.write_frames(
            str(tmp),
            (w, h),
            fps=fps,
            codec="libx264",
            pix_fmt_in="rgb24",
            pix_fmt_out="yuv420p",
            quality=None,  # we pass -crf ourselves
            macro_block_size=1,  # sizes are already even; never let ffmpeg rescale
            ffmpeg_log_level="error",
            output_params=[
                "-crf", str(crf),
                "-preset", "medium",
                "-movflags", "+faststart",
                "-an",
                "-f", "mp4",
            ],
        )
        try:
            writer.send(None)  # start ffmpeg
            for frame in padded:  # [H, W, 3]
                writer.send(np.ascontiguousarray(frame))
        except (OSError, RuntimeError) as err:
            raise EngineError(f"could not encode MP4: {err}") from err
        finally:
            writer.close()

    return _atomic_write(path, write)


def encode_gif(
    frames: np.ndarray, path: str | os.PathLike[str], *, fps: float = MORPH_FPS, loop: int = 0
) -> Path:
    """Write frames [N, H, W, 3] uint8 as an animated GIF (adaptive palette per frame).

    ``loop=0`` loops forever. GIF timing has 10 ms steps, so the frame duration is rounded.
    """
    _check_frames(frames)
    _check_fps(fps)
    if isinstance(loop, bool) or not isinstance(loop, int) or loop < 0:
        raise EngineError(f"loop must be a whole number >= 0 (0 = forever), got {loop!r}")
    duration_ms = max(20, round(100.0 / fps) * 10)  # browsers treat < 20 ms as 100 ms
    images = [
        Image.fromarray(f).convert("P", palette=Image.Palette.ADAPTIVE, colors=256)
        for f in frames  # [H, W, 3]
    ]

    def write(tmp: Path) -> None:
        images[0].save(
            tmp,
            format="GIF",
            save_all=True,
            append_images=images[1:],
            duration=duration_ms,
            loop=loop,
            disposal=1,
        )

    return _atomic_write(path, write)


def write_animation(
    frames: np.ndarray, path: str | os.PathLike[str], *, fps: float = MORPH_FPS
) -> Path:
    """Write frames [N, H, W, 3] uint8 as MP4 or GIF, chosen by the file suffix."""
    suffix = Path(path).suffix.lower()
    if suffix == ".mp4":
        return encode_mp4(frames, path, fps=fps)
    if suffix == ".gif":
        return encode_gif(frames, path, fps=fps)
    raise EngineError(f"cannot write {suffix or 'a file without a suffix'}: use .mp4 or .gif")


_VIDEO_STREAM = re.compile(r"^\s*Stream #\d+:\d+.*?: Video: (?P<spec>.*)$", re.MULTILINE)
_AUDIO_STREAM = re.compile(r"^\s*Stream #\d+:\d+.*?: Audio: ", re.MULTILINE)
_FRAME_COUNT = re.compile(r"frame=\s*(\d+)")
_FPS = re.compile(r"(\d+(?:\.\d+)?)\s+fps\b")
_SIZE = re.compile(r"^(\d+)x(\d+)")


def _drop_parens(text: str) -> str:
    while True:
        stripped = re.sub(r"\([^()]*\)", "", text)
        if stripped == text:
            return text
        text = stripped


def probe(path: str | os.PathLike[str]) -> VideoInfo:
    """Frame count, size, fps, codec, pixel format and audio presence of a video or GIF.

    Runs imageio-ffmpeg's bundled ffmpeg once: it decodes every frame to count them.
    """
    src = Path(path)
    if not src.is_file():
        raise EngineError(f"no such file: {src}")
    cmd = [
        imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-nostdin", "-i", str(src),
        "-map", "0:v:0", "-f", "null", "-",
    ]
    proc = subprocess.run(cmd, capture_output=True, check=False, timeout=120)
    log = proc.stderr.decode(errors="replace")
    video = _VIDEO_STREAM.search(log)
    if proc.returncode != 0 or video is None:
        last = log.strip().splitlines()[-1] if log.strip() else "no output"
        raise EngineError(f"cannot read video {src.name}: {last}")
    # "h264 (High) (avc1 / 0x31637661), yuv420p(tv, progressive), 64x64 [SAR 1:1 DAR 1:1], ..."
    parts = [p.strip() for p in _drop_parens(video["spec"]).split(",")]
    codec = parts[0].split()[0]
    pix_fmt = parts[1].split()[0] if len(parts) > 1 else ""
    size = next((m for m in (_SIZE.match(p) for p in parts) if m), None)
    fps = _FPS.search(video["spec"])
    counts = _FRAME_COUNT.findall(log)
    if size is None or not counts:
        raise EngineError(f"cannot read video {src.name}: unexpected ffmpeg output")
    return VideoInfo(
        frames=int(counts[-1]),
        width=int(size[1]),
        height=int(size[2]),
        fps=float(fps[1]) if fps else 0.0,
        codec=codec,
        pix_fmt=pix_fmt,
        has_audio=_AUDIO_STREAM.search(log) is not None,
    )
