"""Morph animations: the latents, the rendered frames, and the MP4/GIF files a user receives."""

from __future__ import annotations

import gc
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import imageio_ffmpeg
import numpy as np
import pytest
import torch
from PIL import Image

from engine.errors import EngineError
from engine.generators import build_demo_generator
from engine.morph import (
    ease,
    interpolation_times,
    layer_mask,
    mix_latents,
    morph_latents,
    render_frames,
    tour_latents,
)
from engine.stylegan2 import Generator
from engine.video import encode_gif, encode_mp4, probe, write_animation

FRAMES = 6
BATCH = 4


@dataclass(frozen=True)
class Rendered:
    G: Generator
    a: torch.Tensor  # [num_ws, w_dim]
    b: torch.Tensor  # [num_ws, w_dim]
    ws: torch.Tensor  # [FRAMES, num_ws, w_dim]
    frames: np.ndarray  # [FRAMES, H, W, 3] uint8
    ends: np.ndarray  # [2, H, W, 3]: A and B rendered on their own
    calls: list[tuple[int, int, dict[str, Any]]]


@pytest.fixture(scope="module")
def rendered() -> Rendered:
    G = build_demo_generator()
    with torch.no_grad():
        ws = G.mapping(torch.randn(2, G.cfg.z_dim, generator=torch.Generator().manual_seed(7)))
    a, b = ws[0], ws[1]
    calls: list[tuple[int, int, dict[str, Any]]] = []
    morph = morph_latents(a, b, frames=FRAMES)
    frames = render_frames(
        G, morph, batch_size=BATCH, progress=lambda s, t, i: calls.append((s, t, dict(i)))
    )
    ends = render_frames(G, torch.stack([a, b]))
    return Rendered(G, a, b, morph, frames, ends, calls)


def _max_diff(x: np.ndarray, y: np.ndarray) -> int:
    return int(np.abs(x.astype(np.int16) - y.astype(np.int16)).max())


def _top_level_boxes(path: Path) -> list[str]:
    data = path.read_bytes()
    boxes, pos = [], 0
    while pos + 8 <= len(data):
        size, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if size == 1:
            size = struct.unpack(">Q", data[pos + 8:pos + 16])[0]
        boxes.append(kind.decode("latin-1"))
        if size < 8:
            break
        pos += size
    return boxes


def _decode(path: Path) -> tuple[tuple[int, int], list[np.ndarray]]:
    """All frames [H, W, 3] of a video, decoded by imageio-ffmpeg, and its (width, height)."""
    # imageio-ffmpeg (0.6) leaves the pipes of an ffmpeg that already exited unclosed; their
    # ResourceWarning is that library's, so it is silenced here and nowhere else.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        reader = imageio_ffmpeg.read_frames(str(path))
        meta = next(reader)
        w, h = meta["size"]
        frames = [np.frombuffer(f, np.uint8).reshape(h, w, 3) for f in reader]
        del reader
        gc.collect()
    return (w, h), frames


# --- latents and timing ---------------------------------------------------------------


def test_morph_goes_from_a_to_b(rendered: Rendered) -> None:
    r = rendered
    assert r.frames.shape == (FRAMES, r.G.resolution, r.G.resolution, 3)
    assert r.frames.dtype == np.uint8
    assert torch.equal(r.ws[0], r.a) and torch.equal(r.ws[-1], r.b)
    # Batched vs single rendering may differ by one rounding step, nothing more.
    assert _max_diff(r.frames[0], r.ends[0]) <= 1
    assert _max_diff(r.frames[-1], r.ends[1]) <= 1
    assert _max_diff(r.ends[0], r.ends[1]) > 50  # A and B really look different
    for f in r.frames[1:-1]:
        assert _max_diff(f, r.ends[0]) > 5
        assert _max_diff(f, r.ends[1]) > 5


@pytest.mark.parametrize("easing", ["linear", "smooth", "cosine"])
def test_easing_starts_at_0_ends_at_1_and_never_goes_back(easing: Any) -> None:
    t = interpolation_times(30, easing=easing, pingpong=False)
    assert t.shape == (30,)
    assert float(t[0]) == 0.0 and float(t[-1]) == 1.0
    assert bool((t[1:] >= t[:-1]).all())
    e = ease(torch.tensor([0.0, 0.5, 1.0]), easing=easing)
    assert e.tolist() == pytest.approx([0.0, 0.5, 1.0])
    with pytest.raises(EngineError, match="easing"):
        ease(t, easing="bouncy")  # type: ignore[arg-type]


def test_smooth_easing_is_smoothstep() -> None:
    t = torch.tensor([0.25, 0.75])
    assert ease(t, easing="smooth").tolist() == pytest.approx([0.15625, 0.84375])


def test_pingpong_goes_back_without_repeating_the_ends(rendered: Rendered) -> None:
    t = interpolation_times(5, easing="smooth", pingpong=True)
    assert t.shape == (8,)
    assert t.tolist().count(0.0) == 1 and t.tolist().count(1.0) == 1
    n = len(t)
    assert all(float(t[i]) == float(t[(n - i) % n]) for i in range(n))  # loops seamlessly
    ws = morph_latents(rendered.a, rendered.b, frames=5, pingpong=True)
    assert ws.shape == (8, *rendered.a.shape)
    assert torch.equal(ws[1], ws[7]) and torch.equal(ws[3], ws[5])
    assert torch.equal(ws[0], rendered.a) and torch.equal(ws[4], rendered.b)


def test_coarse_morph_moves_only_the_coarse_layers(rendered: Rendered) -> None:
    a, b = rendered.a, rendered.b
    ws = morph_latents(a, b, frames=5, layers="coarse", easing="linear")
    assert torch.equal(ws[:, 4:], a[4:].expand(5, -1, -1))  # the rest stay A's, every frame
    for i in range(1, 5):
        assert bool((ws[i, :4] != a[:4]).any(dim=1).all())
    assert torch.equal(ws[-1, :4], b[:4])


def test_mix_puts_b_styles_exactly_in_the_group(rendered: Rendered) -> None:
    a, b = rendered.a, rendered.b
    num_ws = a.shape[0]
    for group, sl in (("coarse", slice(0, 4)), ("middle", slice(4, 8)), ("fine", slice(8, None))):
        mixed = mix_latents(a, b, layers=group)  # type: ignore[arg-type]
        mask = layer_mask(group, num_ws)
        assert torch.equal(mixed[sl], b[sl])
        assert torch.equal(mixed[~mask], a[~mask])
    assert torch.equal(mix_latents(a, b, layers="all"), b)


def test_progress_is_reported_per_batch_up_to_the_total(rendered: Rendered) -> None:
    steps = [s for s, _, _ in rendered.calls]
    assert steps == [BATCH, FRAMES]  # 6 frames in batches of 4: two calls
    assert all(t == FRAMES and i == {"stage": "render"} for _, t, i in rendered.calls)


# --- files ------------------------------------------------------------------------------


def test_mp4_plays_inline(rendered: Rendered, tmp_path: Path) -> None:
    out = tmp_path / "morph.mp4"
    assert encode_mp4(rendered.frames, out, fps=12) == out
    res = rendered.G.resolution
    info = probe(out)
    assert (info.frames, info.width, info.height) == (FRAMES, res, res)
    assert (info.codec, info.pix_fmt, info.has_audio) == ("h264", "yuv420p", False)
    assert info.fps == pytest.approx(12)
    boxes = _top_level_boxes(out)
    assert boxes.index("moov") < boxes.index("mdat")  # faststart: playable while downloading
    size, decoded = _decode(out)
    assert size == (res, res) and len(decoded) == FRAMES
    err = np.abs(decoded[2].astype(float) - rendered.frames[2]).mean()
    assert err < 12  # the picture survives compression
    assert [p.name for p in tmp_path.iterdir()] == ["morph.mp4"]  # no temp files left


def test_odd_sized_frames_are_padded_not_rescaled(rendered: Rendered, tmp_path: Path) -> None:
    f = rendered.frames[:, :63, :]  # [N, 63, 64, 3]
    f = np.concatenate([f, f[:, :, -1:]], axis=2)  # [N, 63, 65, 3]
    out = write_animation(f, tmp_path / "odd.mp4", fps=24)
    info = probe(out)
    assert (info.frames, info.width, info.height) == (FRAMES, 66, 64)
    size, decoded = _decode(out)
    assert size == (66, 64) and len(decoded) == FRAMES
    first = decoded[0]  # [64, 66, 3]
    err = np.abs(first[:63, :65].astype(float) - f[0]).mean()
    assert err < 12  # same pixels in the same place: padded, not stretched


def test_gif_opens_with_all_frames_and_loops(rendered: Rendered, tmp_path: Path) -> None:
    out = write_animation(rendered.frames, tmp_path / "morph.gif", fps=10)
    res = rendered.G.resolution
    with Image.open(out) as im:
        assert im.format == "GIF"
        assert getattr(im, "n_frames", 1) == FRAMES and im.size == (res, res)
        assert im.info["loop"] == 0
        assert im.info["duration"] == 100
        im.seek(3)
        frame3 = np.asarray(im.convert("RGB"))
    assert np.abs(frame3.astype(float) - rendered.frames[3]).mean() < 12
    assert [p.name for p in tmp_path.iterdir()] == ["morph.gif"]


def test_gif_loop_count_is_written(rendered: Rendered, tmp_path: Path) -> None:
    out = encode_gif(rendered.frames[:3], tmp_path / "once.gif", fps=24, loop=2)
    with Image.open(out) as im:
        assert getattr(im, "n_frames", 1) == 3 and im.info["loop"] == 2


# --- bad input --------------------------------------------------------------------------


@pytest.mark.parametrize("frames", [1, 0, 241, 1000])
def test_frame_counts_out_of_range_are_refused(rendered: Rendered, frames: int) -> None:
    with pytest.raises(EngineError, match="between 2 and 240"):
        morph_latents(rendered.a, rendered.b, frames=frames)


def test_mismatched_latents_are_refused(rendered: Rendered) -> None:
    a = rendered.a
    with pytest.raises(EngineError, match="do not match"):
        morph_latents(a, torch.zeros(18, 512), frames=4)
    with pytest.raises(EngineError, match=r"\[num_ws, w_dim\]"):
        morph_latents(a[None], a[None], frames=4)
    with pytest.raises(EngineError, match="do not match"):
        mix_latents(a, a[:, :256], layers="coarse")
    with pytest.raises(EngineError, match=r"latents must be \[N, 10, 512\]"):
        render_frames(rendered.G, torch.zeros(2, 18, 512))


def test_unknown_layer_group_is_refused(rendered: Rendered) -> None:
    with pytest.raises(EngineError, match="unknown layer group 'eyes'"):
        morph_latents(rendered.a, rendered.b, frames=4, layers="eyes")  # type: ignore[arg-type]
    with pytest.raises(EngineError, match="fine"):
        layer_mask("fine", 8)  # an 8-ws model has no fine layers


def test_unknown_suffix_is_refused(rendered: Rendered, tmp_path: Path) -> None:
    with pytest.raises(EngineError, match=r"\.webm.*use \.mp4 or \.gif"):
        write_animation(rendered.frames, tmp_path / "out.webm", fps=24)
    assert list(tmp_path.iterdir()) == []


def test_a_tour_passes_through_every_face_and_loops_back() -> None:
    """A group morph: each face exactly at the start of its leg, and the frame after the last one
    would be the first face again (no frame shown twice when the video loops)."""
    gen = torch.Generator().manual_seed(5)
    faces = [torch.randn(6, 8, generator=gen) for _ in range(3)]
    ws = tour_latents(faces, frames=5)
    assert ws.shape == (3 * 4, 6, 8)
    for i, face in enumerate(faces):
        assert torch.equal(ws[4 * i], face)
    # The last frame lies on the way from the third face back to the first, short of it.
    way, done = faces[0] - faces[2], ws[-1] - faces[2]
    t = float((done * way).sum() / (way * way).sum())
    assert 0.5 < t < 1 and torch.allclose(done, t * way, atol=1e-5)
    with pytest.raises(EngineError, match="at least two"):
        tour_latents(faces[:1], frames=5)
