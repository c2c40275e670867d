"""W+ inversion: find latents whose renders match aligned face photos.

In the spirit of Image2StyleGAN, done better: start from ``w_avg`` (not zeros), a perceptual
(LPIPS) loss plus MSE at <= 256 px, an optional identity loss, optional per-layer noise
optimisation with NVIDIA's noise regulariser, and a warm-up + cosine learning-rate schedule.
Batched: B photos are optimised in one run, each independently (the loss is a sum over the
batch and Adam is element-wise, so a photo's result does not depend on its batch mates).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from engine.identity import IdentityLoss
from engine.optim import adam_steps, pad_rows, padded_size
from engine.perceptual import LPIPS
from engine.progress import ProgressFn, no_progress
from engine.stylegan2 import Generator, NoiseMode
from settings import EngineConfig

__all__ = ["DEFAULT_STEPS", "ENCODER_LR", "ENCODER_STEPS", "InversionResult", "invert", "psnr"]

DEFAULT_STEPS = EngineConfig().invert_steps  # the one default: `[engine] invert_steps`
ENCODER_STEPS = EngineConfig().encoder_invert_steps  # ... and from an encoder's start
# From a start near the answer, a large rate's first Adam steps (the rate in every coordinate) undo
# it: BENCHMARKS.md, "Encoder start".
ENCODER_LR = 0.01



@dataclass
class InversionResult:
    latents: torch.Tensor  # [B, num_ws, w_dim] float32, CPU
    images: torch.Tensor  # [B, 3, H, W] reconstructions in [-1, 1], CPU
    psnr: list[float]  # dB, images in [-1, 1] (peak-to-peak 2)
    lpips: list[float]
    steps: int
    seconds: float
    noise: dict[str, torch.Tensor] = field(default_factory=dict)  # per layer [B,1,r,r] if optimised
    start_psnr: list[float] = field(default_factory=list)  # dB of the encoder's start, when one was used


def psnr(images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-sample PSNR in dB for images in [-1, 1]. [B,3,H,W] x2 -> [B]."""
    mse = (images.clamp(-1, 1) - targets).square().flatten(1).mean(1)
    return 10 * torch.log10(4.0 / mse.clamp_min(1e-12))


def _noise_regularizer(noise: dict[str, torch.Tensor]) -> torch.Tensor:
    """NVIDIA projector's multi-scale autocorrelation penalty, per sample. -> [B]."""
    total: torch.Tensor | float = 0.0
    for v in noise.values():  # [B, 1, r, r]
        n = v
        while True:
            total = total + (n * torch.roll(n, 1, dims=3)).mean(dim=[1, 2, 3]).square()
            total = total + (n * torch.roll(n, 1, dims=2)).mean(dim=[1, 2, 3]).square()
            if n.shape[2] <= 8:
                break
            n = F.avg_pool2d(n, kernel_size=2)
    assert isinstance(total, torch.Tensor)
    return total


def _loss_size(x: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(x, size=(size, size), mode="area") if x.shape[-1] > size else x


def invert(
    G: Generator,
    targets: torch.Tensor,
    *,
    perceptual: LPIPS,
    steps: int = DEFAULT_STEPS,
    lr: float = 0.2,
    mse_weight: float = 1.0,
    identity: IdentityLoss | None = None,
    identity_weight: float = 0.1,
    optimize_noise: bool = False,
    noise_reg_weight: float = 1e5,
    loss_resolution: int = 256,
    noise_mode: NoiseMode = "const",
    graph: bool | None = None,
    bf16: bool | None = None,
    pad: bool | None = None,
    compile: bool | None = None,
    start: torch.Tensor | None = None,
    first_look: Callable[[torch.Tensor], None] | None = None,
    progress: ProgressFn = no_progress,
) -> InversionResult:
    """Invert ``targets`` [B, 3, R, R] in [-1, 1] (R = G.resolution) into W+ latents.

    ``perceptual`` and ``identity`` are per-sample distances (engine.perceptual, engine.identity);
    the targets' features are computed once. ``graph``: replay the step as a CUDA graph;
    ``bf16``: run the networks under bfloat16 autocast while optimising (the result is rendered
    in float32). Both default to on for CUDA devices (BENCHMARKS.md has the measured gains).
    ``pad``: run the batch padded to ``batch_bucket(B)`` rows (copies of the last target, results
    dropped), so that a GPU sees few batch sizes; default on for CUDA devices. ``compile``: the
    step through ``torch.compile`` (``engine.optim.adam_steps``; compiling takes 1-3 minutes per
    batch size, once per process); default on for CUDA devices. ``start``: the latents [B, num_ws,
    w_dim] to start from (an encoder's guess; give a smaller ``lr``, e.g. ``ENCODER_LR``), default
    ``w_avg`` for every layer; a photo whose start was closer (PSNR) than the result keeps the start.
    ``first_look(images)``: the start rendered ([B, 3, R, R] in [-1, 1]), before the optimisation.
    ``progress(step, steps, {"loss": ..., "psnr": ...})`` is called every step on the CPU, every 10
    on a GPU (reading the figures waits for the GPU).
    """
    res = G.resolution
    if targets.ndim != 4 or targets.shape[1] != 3 or targets.shape[2:] != (res, res):
        raise ValueError(f"targets must be [B, 3, {res}, {res}], got {list(targets.shape)}")
    if steps < 1:
        raise ValueError("steps must be >= 1")
    began = time.perf_counter()
    device = G.w_avg.device
    targets = targets.to(device, torch.float32)
    b = targets.shape[0]
    n = padded_size(b, device, pad)
    targets = pad_rows(targets, n)

    if start is None:
        ws = G.w_avg.detach().reshape(1, 1, -1).repeat(n, G.num_ws, 1)  # [n, num_ws, w_dim]
    elif start.shape != (b, G.num_ws, G.w_dim):
        raise ValueError(f"start must be [{b}, {G.num_ws}, {G.w_dim}], got {list(start.shape)}")
    else:
        ws = pad_rows(start.detach().to(device, torch.float32), n)
    first = ws.clone() if start is not None else None
    ws = ws.clone()
    ws.requires_grad_(True)
    params = [ws]
    noise: dict[str, torch.Tensor] = {}
    if optimize_noise:
        for name, layer in G.synthesis.noise_layers().items():
            r = layer.resolution
            buf = layer.noise_const.detach().reshape(1, 1, r, r).repeat(n, 1, 1, 1)
            noise[name] = buf.clone().requires_grad_(True)
        params += list(noise.values())
    mode = "const" if optimize_noise else noise_mode

    target_small = _loss_size(targets, loss_resolution)
    # The latest PSNR [B] (a graph's output when replayed). Filled now: a compiled step that first
    # saw it empty would be compiled again on the next step.
    last: dict[str, torch.Tensor] = {"psnr": torch.zeros(n, device=device)}
    use_bf16 = device.type == "cuda" if bf16 is None else bf16
    perceptual_to = perceptual.against(target_small)
    identity_to = identity.against(targets) if identity is not None else None
    if first is not None:  # rendered once: shown first, and compared with the result at the end
        with torch.no_grad():
            images0 = G.synthesis(first, noise_mode=mode)
            p0, d0 = psnr(images0, targets), perceptual_to(_loss_size(images0, loss_resolution))
        if first_look is not None:
            first_look(images0[:b].clamp(-1, 1))

    def loss_fn() -> torch.Tensor:  # [B]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            images = G.synthesis(ws, noise_mode=mode, noise=noise or None).float()
            small = _loss_size(images, loss_resolution)
            loss = perceptual_to(small)
            loss = loss + mse_weight * (small - target_small).square().flatten(1).mean(1)
            if identity_to is not None:
                loss = loss + identity_weight * identity_to(images)
        if noise:
            loss = loss + noise_reg_weight * _noise_regularizer(noise)
        with torch.no_grad():
            last["psnr"] = psnr(images, targets)
        return loss

    def on_step(step: int, loss: torch.Tensor) -> None:
        progress(step, steps, {"loss": float(loss[:b].mean()), "psnr": float(last["psnr"][:b].mean())})

    adam_steps(params, loss_fn, steps=steps, lr=lr, post_step=_normalize(noise) if noise else None,
               on_step=on_step, report_every=10 if device.type == "cuda" else 1, graph=graph,
               compile=device.type == "cuda" if compile is None else compile)

    with torch.no_grad():
        final_noise = {k: v.detach() for k, v in noise.items()}
        images = G.synthesis(ws.detach(), noise_mode=mode, noise=final_noise or None)
        latents = ws.detach()
        p = psnr(images, targets)
        d = perceptual_to(_loss_size(images, loss_resolution))
        start_psnr: list[float] = []
        if first is not None and not noise:  # never end further from the photo than the start
            keep = p0 > p
            latents = torch.where(keep[:, None, None], first, latents)
            images = torch.where(keep[:, None, None, None], images0, images)
            p, d = torch.where(keep, p0, p), torch.where(keep, d0, d)
            start_psnr = [float(x) for x in p0[:b]]
    return InversionResult(
        latents=latents[:b].float().cpu(),
        images=images[:b].clamp(-1, 1).cpu(),
        psnr=[float(x) for x in p[:b]],
        lpips=[float(x) for x in d[:b]],
        steps=steps,
        seconds=time.perf_counter() - began,
        noise={k: v[:b].cpu() for k, v in final_noise.items()},
        start_psnr=start_psnr,
    )


def _normalize(noise: dict[str, torch.Tensor]) -> Callable[[], None]:
    """After each update: every noise map back to zero mean, unit variance (NVIDIA's projector)."""
    def post_step() -> None:
        for n in noise.values():
            n -= n.mean(dim=[1, 2, 3], keepdim=True)
            n *= n.square().mean(dim=[1, 2, 3], keepdim=True).rsqrt()
    return post_step
