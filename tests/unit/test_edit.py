"""StyleCLIP edits on the demo generator + tiny CLIP: global directions and latent optimisation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.checkpoints import content_hash
from engine.clip_model import ClipModel, build_demo_clip
from engine.directions import (
    ChannelTable,
    load_or_build_table,
    table_path,
    text_to_style_delta,
)
from engine.edit import edit_optimize, render_global_edit
from engine.errors import EngineError
from engine.generators import build_demo_generator
from engine.stylegan2 import Generator

TARGET, NEUTRAL = "smiling face", "face"


@pytest.fixture(scope="module")
def G() -> Generator:
    return build_demo_generator()


@pytest.fixture(scope="module")
def clip_model() -> ClipModel:
    return build_demo_clip()


@pytest.fixture(scope="module")
def table(G: Generator, clip_model: ClipModel, tmp_path_factory: pytest.TempPathFactory) -> ChannelTable:
    home = tmp_path_factory.mktemp("home")
    calls: list[int] = []
    table, built = load_or_build_table(
        G, clip_model.encode_images, model_hash=content_hash(G), clip_key=clip_model.model_key,
        home=home, samples=2, progress=lambda s, t, i: calls.append(s))
    assert built and calls[-1] == sum(table.sizes) and len(table.layers) == 9
    assert table_path(home, model_hash=content_hash(G), clip_key=clip_model.model_key).exists()
    # Second call: loaded from the cache, nothing recomputed.
    calls.clear()
    again, built = load_or_build_table(
        G, clip_model.encode_images, model_hash=content_hash(G), clip_key=clip_model.model_key,
        home=home, samples=2, progress=lambda s, t, i: calls.append(s))
    assert not built and calls == []
    assert torch.equal(again.directions, table.directions)
    return table


def _source(G: Generator, n: int = 2) -> torch.Tensor:
    with torch.no_grad():
        z = torch.randn(n, G.cfg.z_dim, generator=torch.Generator().manual_seed(5))
        return G.mapping(z, truncation_psi=0.7)


def test_table_rows_are_unit_directions(table: ChannelTable) -> None:
    norms = table.directions.norm(dim=-1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-4)
    assert (table.style_std > 0).all()


def test_global_edit_strength_moves_the_clip_score(
    G: Generator, clip_model: ClipModel, table: ChannelTable
) -> None:
    dt = clip_model.text_direction(TARGET, NEUTRAL)
    delta, kept = text_to_style_delta(table, dt, beta=0.05)
    assert 0 < kept <= sum(table.sizes)
    ws = _source(G)
    base = render_global_edit(G, ws, delta, strength=0.0)
    with torch.no_grad():
        assert torch.equal(base, G.synthesis(ws).clamp(-1, 1))  # strength 0: the source, exactly
    plus = render_global_edit(G, ws, delta, strength=1.5)
    minus = render_global_edit(G, ws, delta, strength=-1.5)
    assert float((plus - base).abs().max()) > 0.05

    def score(images: torch.Tensor) -> torch.Tensor:
        return clip_model.encode_images(images) @ dt  # along the text direction

    with torch.no_grad():
        s0, sp, sm = score(base), score(plus), score(minus)
    assert float(sp.mean()) > float(s0.mean()) > float(sm.mean()), (s0, sp, sm)


def test_unrelated_text_under_beta_is_a_clear_error(clip_model: ClipModel, table: ChannelTable) -> None:
    dt = clip_model.text_direction(TARGET, NEUTRAL)
    with pytest.raises(EngineError, match="beta"):
        text_to_style_delta(table, dt, beta=1.01)


def test_latent_optimisation_lowers_the_clip_loss(G: Generator, clip_model: ClipModel) -> None:
    src = _source(G)
    texts = torch.stack([clip_model.text_embedding("a smiling face"),
                         clip_model.text_embedding("a face with a beard")])
    seen: list[int] = []
    result = edit_optimize(G, src, texts, encode=clip_model.encode_images, steps=30,
                           l2_weight=0.001, progress=lambda s, t, i: seen.append(s))
    assert seen == list(range(1, 31))
    first, last = result.clip_loss[0], result.clip_loss[-1]
    assert all(b < a - 0.01 for a, b in zip(first, last, strict=True)), (first, last)
    assert result.latents.shape == src.shape and result.images.shape == (2, 3, 64, 64)


def test_a_padded_batch_of_edits_gives_each_the_result_it_gets_alone(
    G: Generator, clip_model: ClipModel
) -> None:
    src = _source(G, 3)
    texts = torch.stack([clip_model.text_embedding(t) for t in ("a smiling face", "a beard", "old")])
    padded = edit_optimize(G, src, texts, encode=clip_model.encode_images, steps=6, pad=True)
    plain = edit_optimize(G, src, texts, encode=clip_model.encode_images, steps=6, pad=False)
    assert padded.latents.shape == src.shape and padded.images.shape == (3, 3, 64, 64)
    # A mix-up between rows would move latents by ~1; float rounding between batch shapes ~1e-4.
    assert float((padded.latents - plain.latents).abs().max()) < 2e-3
    assert all(len(row) == 3 for row in padded.clip_loss)
    assert padded.clip_loss[-1] == pytest.approx(plain.clip_loss[-1], abs=1e-3)


def test_large_l2_weight_keeps_the_latent_close(G: Generator, clip_model: ClipModel) -> None:
    src = _source(G, 1)
    text = clip_model.text_embedding("a smiling face")[None]
    free = edit_optimize(G, src, text, encode=clip_model.encode_images, steps=20, l2_weight=0.0)
    tied = edit_optimize(G, src, text, encode=clip_model.encode_images, steps=20, l2_weight=10.0)
    dist_free = float((free.latents - src).norm())
    dist_tied = float((tied.latents - src).norm())
    assert dist_tied < 0.25 * dist_free, (dist_tied, dist_free)


def test_an_interrupted_build_resumes_after_its_last_saved_chunk(
    G: Generator, clip_model: ClipModel, tmp_path: Path
) -> None:
    from engine.directions import TableBuild, build_channel_table

    whole = build_channel_table(G, clip_model.encode_images, model_hash="m", clip_key="c", samples=1)
    work = tmp_path / "work"

    def build() -> TableBuild:  # 32 channels a chunk: 64 images of one sample, minus and plus
        return TableBuild(G, clip_model.encode_images, model_hash="m", clip_key="c", samples=1,
                          batch_size=64, work_dir=work)

    first = build()
    while first.done < first.sizes[0] + 64:  # the first layer and two chunks of the second
        first.step()
    assert (work / f"{first.layers[0]}.npy").exists()  # a finished layer's chunks are merged
    resumed = build()  # another process, later
    assert resumed.done == first.sizes[0] + 64 and resumed.layer == first.layers[1]
    steps = 0
    while not resumed.finished:
        resumed.step()
        steps += 1
    left = [resumed.sizes[1] - 64, *resumed.sizes[2:]]
    assert steps == sum(-(-size // 32) for size in left)  # nothing measured twice
    assert torch.allclose(resumed.table().directions, whole.directions, atol=1e-5)


def test_one_process_builds_a_table_while_others_wait_for_it(
    G: Generator, clip_model: ClipModel, tmp_path: Path
) -> None:
    from engine.directions import TableKeeper

    def keeper() -> TableKeeper:
        return TableKeeper(G, clip_model.encode_images, model_hash="m" * 16, clip_key="c",
                           home=tmp_path, samples=1)

    builder, other = keeper(), keeper()
    assert builder.build_step() and builder.progress == 0.0
    assert not other.build_step() and other.ready() is None  # the lock is held: nothing to do
    with pytest.raises(EngineError, match="another process is building"):
        load_or_build_table(G, clip_model.encode_images, model_hash="m" * 16, clip_key="c",
                            home=tmp_path, samples=1)
    while builder.build_step():
        pass
    table = other.ready()
    assert table is not None and torch.equal(table.directions, builder.ready().directions)
    assert not list(tmp_path.glob("directions/*.partial"))  # the chunks are gone once it is saved
