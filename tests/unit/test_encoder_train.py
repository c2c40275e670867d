"""Training an encoder on the demo generator's own samples, on the CPU: it learns, it resumes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from engine import encoder_train
from engine.encoder_cmd import TrainSettings, encoder_config, run_train, train_state_path
from engine.encoder_io import load_encoder
from engine.encoder_train import TrainState, evaluate_encoder, new_encoder, train_encoder
from engine.errors import EngineError
from engine.generators import build_demo_generator
from engine.perceptual import LPIPS, demo_lpips
from engine.stylegan2 import Generator


@pytest.fixture(scope="module")
def demo() -> tuple[Generator, LPIPS]:
    """The demo generator and the demo LPIPS stand-in (no downloads)."""
    return build_demo_generator(), demo_lpips()


def _total(q: dict[str, float]) -> float:
    return q["latent"] + 0.8 * q["lpips"] + q["mse"]  # train_encoder's default weights


def test_pairs_are_reproducible_and_around_w(demo: tuple[Generator, LPIPS]) -> None:
    G, _ = demo
    sigma = encoder_train.w_spread(G)
    draw = [encoder_train.sample_pairs(G, batch_size=4, sigma=sigma, spread=0.2, mixing=0.5,
                                       generator=torch.Generator().manual_seed(7))
            for _ in range(2)]
    assert torch.equal(draw[0][0], draw[1][0]) and torch.equal(draw[0][1], draw[1][1])
    wplus, images = draw[0]
    assert wplus.shape == (4, G.num_ws, G.w_dim) and images.shape == (4, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(images, G.synthesis(wplus).clamp(-1, 1), atol=1e-5)
    # W+ near W: each layer stays within a few spreads of the mean latent, yet layers differ.
    assert float(((wplus - G.w_avg) / sigma).square().mean()) < 3
    assert float((wplus[:, 1] - wplus[:, 0]).abs().mean()) > 0.05 * float(sigma.mean())


def test_training_lowers_the_loss_on_held_out_samples(demo: tuple[Generator, LPIPS]) -> None:
    G, perceptual = demo
    cfg = encoder_config(G, "auto", is_demo=True)
    encoder = new_encoder(G, cfg)
    with torch.no_grad():  # a fresh encoder starts at the mean latent
        start = encoder(torch.zeros(1, 3, 64, 64))
    assert torch.allclose(start[0, 1:] - start[0, :1], torch.zeros(1), atol=1e-6)
    before = evaluate_encoder(G, encoder, perceptual=perceptual)
    seen: list[tuple[int, int, dict[str, Any]]] = []
    result = train_encoder(G, encoder, perceptual=perceptual, steps=10, batch_size=4, lr=3e-3,
                           warmup=0, progress=lambda s, t, i: seen.append((s, t, i)))
    after = evaluate_encoder(G, encoder, perceptual=perceptual)
    assert (result.start_step, result.steps, len(result.losses)) == (0, 10, 10)
    assert [s for s, _, _ in seen] == list(range(1, 11)) and all(t == 10 for _, t, _ in seen)
    assert "eta_s" not in seen[0][2] and seen[4][2]["eta_s"] > 0 and seen[-1][2]["eta_s"] == 0
    assert {"loss", "latent", "lpips", "mse", "steps_per_s"} <= seen[-1][2].keys()
    assert _total(after) < 0.97 * _total(before), (before, after)
    assert after["psnr"] > before["psnr"] + 0.5
    assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())


def test_a_resumed_run_ends_where_an_uninterrupted_one_does(
    demo: tuple[Generator, LPIPS],
) -> None:
    G, perceptual = demo
    cfg = encoder_config(G, "small", is_demo=True)
    kwargs: dict[str, Any] = dict(perceptual=perceptual, steps=6, batch_size=2, lr=1e-3, warmup=3)

    straight = new_encoder(G, cfg)
    train_encoder(G, straight, **kwargs)

    saved: list[TrainState] = []

    class Stop(Exception):
        pass

    def crash_after_4(step: int, total: int, info: dict[str, Any]) -> None:
        if step == 4:
            raise Stop

    first = new_encoder(G, cfg)
    with pytest.raises(Stop):
        train_encoder(G, first, save_every=3, on_save=saved.append, progress=crash_after_4,
                      **kwargs)
    assert [s.step for s in saved] == [3]
    again = new_encoder(G, cfg, seed=99)  # whatever it starts with is replaced by the state
    result = train_encoder(G, again, resume=saved[0], save_every=3, on_save=saved.append,
                           **kwargs)
    assert (result.start_step, result.steps, len(result.losses)) == (3, 6, 3)
    assert [s.step for s in saved] == [3, 6]
    for key, value in straight.state_dict().items():
        assert torch.allclose(again.state_dict()[key].float(), value.float(), atol=1e-6), key
    # ... and the steps taken after the resume mattered (the state is not just the start).
    assert not torch.equal(saved[0].encoder["styles.0.linear.weight"],
                           straight.state_dict()["styles.0.linear.weight"])


def test_run_train_writes_the_encoder_and_resumes_from_its_state(tmp_path: Path) -> None:
    out = tmp_path / "enc.safetensors"
    said: list[str] = []
    steps: list[int] = []
    report = run_train(model="demo", out=out, steps=3, settings=TrainSettings(batch_size=2),
                       save_every=2, device="cpu", say=said.append,
                       progress=lambda s, t, i: steps.append(s))
    assert steps == [1, 2, 3] and report["steps"] == 3 and report["trained_now"] == 3
    loaded = load_encoder(out)
    assert loaded.model_id == report["model_id"] and loaded.model_id.startswith("sg2-")
    assert train_state_path(out).exists()

    steps.clear()
    report = run_train(model="demo", out=out, steps=5, settings=TrainSettings(batch_size=7),
                       save_every=2, device="cpu", say=said.append,
                       progress=lambda s, t, i: steps.append(s))
    assert steps == [4, 5] and report["trained_now"] == 2
    assert any("resuming from step 3 of 5" in line and "batch size 2" in line for line in said)
    assert load_encoder(out).encoder.state_dict().keys() == loaded.encoder.state_dict().keys()

    with pytest.raises(EngineError, match=r"\.safetensors"):
        run_train(model="demo", out=tmp_path / "enc.pt", steps=1, device="cpu")
    with pytest.raises(EngineError, match="does not exist"):
        run_train(model="demo", out=tmp_path / "no" / "e.safetensors", steps=1, device="cpu")
