"""Train an encoder on a generator's own samples: no photos, any generator.

Each step draws a batch of W+ latents around the mapping network's outputs (``w = mapping(z)``,
style-mixed at a random layer for part of the batch, plus per-layer Gaussian offsets of
``spread`` times W's per-dimension spread: W+ points near W, where inverted photos lie), renders
them with ``G`` and teaches the encoder to map each image back::

    loss = latent_weight * mean(((E(x) - w+) / sigma_W)^2)
         + lpips_weight * LPIPS(G(E(x)), x) + mse_weight * MSE(G(E(x)), x)

The image terms go through the (frozen) generator at <= ``loss_resolution`` px, as inversion's do.
Each step's batch comes from a random generator seeded by ``(seed, step)``, so a run resumed
from a :class:`TrainState` sees the data an uninterrupted run would have seen; with the optimizer
state restored as well, the two end with the same weights.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from engine.encoder import Encoder, EncoderConfig, encoder_input
from engine.invert import psnr
from engine.perceptual import LPIPS
from engine.progress import ProgressFn, no_progress
from engine.stylegan2 import Generator

__all__ = [
    "TrainResult",
    "TrainState",
    "evaluate_encoder",
    "new_encoder",
    "sample_pairs",
    "train_encoder",
    "w_spread",
]

_SPREAD_SAMPLES = 4096


@dataclass
class TrainState:
    """What a resumed run needs: the step reached, the encoder's and Adam's state (CPU tensors)."""

    step: int
    encoder: dict[str, torch.Tensor]
    optimizer: dict[int, dict[str, torch.Tensor]]  # Adam's per-parameter state, by index


@dataclass
class TrainResult:
    start_step: int  # where this run began (0, or the resumed step)
    steps: int  # the step reached
    seconds: float
    losses: list[float]  # the total loss of each step of this run


def new_encoder(G: Generator, cfg: EncoderConfig, *, seed: int = 0) -> Encoder:
    """A fresh encoder for ``G``: ``latent_avg`` = ``G.w_avg``, the offset heads start at zero
    (as e4e's progressive training starts with the deltas off), the ``w`` head small."""
    if cfg.num_ws != G.num_ws or cfg.w_dim != G.w_dim:
        raise ValueError(f"the encoder predicts [{cfg.num_ws}, {cfg.w_dim}] but the generator "
                         f"takes [{G.num_ws}, {G.w_dim}]")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = Encoder(cfg)
    with torch.no_grad():
        encoder.latent_avg.copy_(G.w_avg.detach().cpu().expand(cfg.num_ws, -1))
        for name, param in encoder.named_parameters():
            if name.startswith("styles.") and name.endswith(".linear.weight"):
                param.mul_(0.1 if name == "styles.0.linear.weight" else 0.0)
    return encoder.to(G.w_avg.device)


@torch.no_grad()
def w_spread(G: Generator, *, seed: int = 0, samples: int = _SPREAD_SAMPLES) -> torch.Tensor:
    """Per-dimension standard deviation of W (mapping outputs) [w_dim], from seeded samples."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(samples, G.cfg.z_dim, generator=gen).to(G.w_avg.device)
    w = torch.cat([G.mapping(chunk)[:, 0] for chunk in z.split(1024)])  # [samples, w_dim]
    return w.std(dim=0).clamp_min(1e-6)


@torch.no_grad()
def sample_pairs(
    G: Generator, *, batch_size: int, sigma: torch.Tensor, spread: float, mixing: float,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(w+ [B, num_ws, w_dim], G(w+) [B, 3, R, R]) drawn with ``generator`` (a CPU one)."""
    device = G.w_avg.device
    b, n = batch_size, G.num_ws
    z = torch.randn(2, b, G.cfg.z_dim, generator=generator).to(device)
    cut = torch.randint(1, max(n, 2), (b, 1), generator=generator)
    mixed = torch.rand(b, 1, generator=generator) < mixing
    offsets = torch.randn(b, n, G.w_dim, generator=generator).to(device)
    ws = G.mapping(z.flatten(0, 1)).unflatten(0, (2, b))  # [2, B, num_ws, w_dim]
    second = (mixed & (torch.arange(n)[None] >= cut)).to(device)  # [B, num_ws]
    wplus = torch.where(second[..., None], ws[1], ws[0]) + spread * sigma * offsets
    # Clamped as photos are: a random generator renders far outside [-1, 1] (seen on the GPU bench).
    return wplus, G.synthesis(wplus, noise_mode="const").clamp(-1, 1)


def _small(x: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(x, size=(size, size), mode="area") if x.shape[-1] > size else x


def _losses(
    G: Generator, encoder: Encoder, perceptual: LPIPS, wplus: torch.Tensor, images: torch.Tensor,
    sigma: torch.Tensor, *, loss_resolution: int, bf16: bool,
) -> dict[str, torch.Tensor]:
    """Per-sample latent, LPIPS and MSE terms [B] and the reconstructions."""
    device = images.device
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        pred = encoder(encoder_input(images, encoder.cfg.input_size)).float()
        rec = G.synthesis(pred, noise_mode="const").float()
    latent = ((pred - wplus) / sigma).square().flatten(1).mean(1)
    rec_small, img_small = _small(rec, loss_resolution), _small(images, loss_resolution)
    return {"latent": latent, "lpips": perceptual(rec_small, img_small),
            "mse": (rec_small - img_small).square().flatten(1).mean(1), "images": rec}


def _adam_state(opt: torch.optim.Adam, params: list[torch.nn.Parameter]) -> dict[int, dict]:
    index = {id(p): i for i, p in enumerate(params)}
    return {index[id(p)]: {k: v.detach().cpu().clone() for k, v in s.items()}
            for p, s in opt.state.items()}


def train_encoder(
    G: Generator,
    encoder: Encoder,
    *,
    perceptual: LPIPS,
    steps: int,
    batch_size: int = 8,
    lr: float = 1e-4,
    warmup: int = 100,
    latent_weight: float = 1.0,
    lpips_weight: float = 0.8,
    mse_weight: float = 1.0,
    spread: float = 0.2,
    mixing: float = 0.5,
    loss_resolution: int = 256,
    seed: int = 0,
    resume: TrainState | None = None,
    save_every: int = 0,
    on_save: Callable[[TrainState], None] | None = None,
    bf16: bool | None = None,
    progress: ProgressFn = no_progress,
) -> TrainResult:
    """Train ``encoder`` (in place) for ``G`` up to step ``steps`` (from ``resume.step`` if given).

    Adam at ``lr`` after a linear warm-up over ``warmup`` steps. ``on_save(state)`` gets the state
    every ``save_every`` steps (0: never) and after the last one. ``progress(step, steps, info)``
    after every step, info holding the losses and, from this run's second step on, ``steps_per_s``
    and ``eta_s`` (seconds left at this run's rate).
    ``bf16``: the encoder and generator under bfloat16 autocast; default on CUDA devices.
    """
    if steps < 1 or batch_size < 1:
        raise ValueError("steps and batch_size must be >= 1")
    if encoder.num_ws != G.num_ws or encoder.cfg.w_dim != G.w_dim:
        raise ValueError("the encoder does not predict latents of this generator's shape")
    device = G.w_avg.device
    use_bf16 = device.type == "cuda" if bf16 is None else bf16
    sigma = w_spread(G)
    params = list(encoder.parameters())
    encoder.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    start = 0
    if resume is not None:
        encoder.load_state_dict(resume.encoder)
        opt.load_state_dict({"state": resume.optimizer,
                             "param_groups": opt.state_dict()["param_groups"]})
        start = resume.step
    losses: list[float] = []
    began = time.perf_counter()
    timed_from: tuple[int, float] | None = None  # (step, time) after this run's first step
    encoder.train()
    for step in range(start, steps):
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / warmup) if warmup > 0 else lr
        gen = torch.Generator().manual_seed((seed << 32) + step)
        wplus, images = sample_pairs(G, batch_size=batch_size, sigma=sigma, spread=spread,
                                     mixing=mixing, generator=gen)
        terms = _losses(G, encoder, perceptual, wplus, images, sigma,
                        loss_resolution=loss_resolution, bf16=use_bf16)
        loss = (latent_weight * terms["latent"] + lpips_weight * terms["lpips"]
                + mse_weight * terms["mse"]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        done = step + 1
        losses.append(float(loss.detach()))
        now = time.perf_counter()
        if timed_from is None:
            timed_from = (done, now)
        rate = (done - timed_from[0]) / (now - timed_from[1]) if done > timed_from[0] else 0.0
        info: dict[str, Any] = {k: float(v.detach().mean()) for k, v in terms.items()
                                if k != "images"}
        info["loss"] = losses[-1]
        if rate > 0:  # from this run's second step on
            info.update(steps_per_s=rate, eta_s=(steps - done) / rate)
        progress(done, steps, info)
        if on_save is not None and (done == steps or (save_every > 0 and done % save_every == 0)):
            state = {k: v.detach().cpu().clone() for k, v in encoder.state_dict().items()}
            on_save(TrainState(done, state, _adam_state(opt, params)))
    encoder.eval().requires_grad_(False)
    return TrainResult(start, max(start, steps), time.perf_counter() - began, losses)


@torch.no_grad()
def evaluate_encoder(
    G: Generator, encoder: Encoder, *, perceptual: LPIPS, batch_size: int = 8, seed: int = 1,
    spread: float = 0.2, mixing: float = 0.5, loss_resolution: int = 256,
) -> dict[str, float]:
    """The encoder (in eval mode) on a fixed batch of samples drawn like the training data (with
    another seed): mean latent, LPIPS and MSE terms and the reconstructions' PSNR in dB."""
    was_training = encoder.training
    encoder.eval()
    sigma = w_spread(G)
    gen = torch.Generator().manual_seed((seed << 32) + (1 << 31))
    wplus, images = sample_pairs(G, batch_size=batch_size, sigma=sigma, spread=spread,
                                 mixing=mixing, generator=gen)
    terms = _losses(G, encoder, perceptual, wplus, images, sigma,
                    loss_resolution=loss_resolution, bf16=False)
    encoder.train(was_training)
    out = {k: float(v.mean()) for k, v in terms.items() if k != "images"}
    out["psnr"] = float(psnr(terms["images"], images).mean())
    return out
