"""Morphs and style mixing in W+: interpolate two latents, render the frames.

Everything here is pure and keyword-only; writing the frames to a file is ``engine.video``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import MappingProxyType
from typing import Literal, get_args

import numpy as np
import torch

from engine.errors import EngineError
from engine.progress import ProgressFn
from engine.stylegan2 import Generator, NoiseMode

__all__ = [
    "EASINGS",
    "LAYER_GROUPS",
    "MAX_FRAMES",
    "MIN_FRAMES",
    "Easing",
    "LayerGroup",
    "ease",
    "interpolation_times",
    "layer_mask",
    "mix_latents",
    "morph_latents",
    "render_frames",
    "tour_latents",
]

LayerGroup = Literal["all", "coarse", "middle", "fine"]
Easing = Literal["linear", "smooth", "cosine"]
EASINGS: tuple[str, ...] = get_args(Easing)

# Which ws each group drives, as a slice [start, stop) of the num_ws axis (stop None = to the end).
# coarse: pose and face shape (4-8 px); middle: features, hair, eyes (16-32 px);
# fine: colour scheme and micro texture (64 px and up).
LAYER_GROUPS: Mapping[str, tuple[int, int | None]] = MappingProxyType({
    "all": (0, None),
    "coarse": (0, 4),
    "middle": (4, 8),
    "fine": (8, None),
})

MIN_FRAMES = 2
MAX_FRAMES = 240


def layer_mask(group: str, num_ws: int) -> torch.Tensor:
    """[num_ws] bool: True for the ws the group drives. Unknown or empty groups are errors."""
    if group not in LAYER_GROUPS:
        names = ", ".join(LAYER_GROUPS)
        raise EngineError(f"unknown layer group {group!r}: use one of {names}")
    start, stop = LAYER_GROUPS[group]
    mask = torch.zeros(num_ws, dtype=torch.bool)  # [num_ws]
    mask[start:stop] = True
    if not bool(mask.any()):
        raise EngineError(
            f"this model has only {num_ws} style layers, so the {group!r} group is empty"
        )
    return mask


def ease(t: torch.Tensor, *, easing: Easing) -> torch.Tensor:
    """Map times in [0, 1] to weights in [0, 1]; every easing keeps 0 -> 0 and 1 -> 1."""
    if easing == "linear":
        return t.clone()
    if easing == "smooth":
        return t * t * (3.0 - 2.0 * t)  # smoothstep
    if easing == "cosine":
        return (1.0 - torch.cos(math.pi * t)) / 2.0
    raise EngineError(f"unknown easing {easing!r}: use one of {', '.join(EASINGS)}")


def _check_frames(frames: int) -> None:
    if isinstance(frames, bool) or not isinstance(frames, int):
        raise EngineError(f"frames must be a whole number, got {frames!r}")
    if not MIN_FRAMES <= frames <= MAX_FRAMES:
        raise EngineError(
            f"frames must be between {MIN_FRAMES} and {MAX_FRAMES}, got {frames}"
        )


def interpolation_times(frames: int, *, easing: Easing, pingpong: bool) -> torch.Tensor:
    """Eased weights [N] from A (0.0) to B (1.0) inclusive; N = frames, or 2*frames - 2
    with ``pingpong`` (the way back without repeating either endpoint, so it loops cleanly)."""
    _check_frames(frames)
    t = ease(torch.linspace(0.0, 1.0, frames, dtype=torch.float64), easing=easing)  # [frames]
    t[0], t[-1] = 0.0, 1.0  # exact endpoints whatever the float error
    if pingpong:
        t = torch.cat([t, t[1:-1].flip(0)])  # [2*frames - 2]
    return t.float()


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    for name, x in (("A", a), ("B", b)):
        if not isinstance(x, torch.Tensor):
            raise EngineError(f"latent {name} must be a tensor, got {type(x).__name__}")
        if x.ndim != 2:
            raise EngineError(
                f"latent {name} must be [num_ws, w_dim] (one W+ latent), got {list(x.shape)}"
            )
        if not x.is_floating_point():
            raise EngineError(f"latent {name} must be floating point, got {x.dtype}")
    if a.shape != b.shape:
        raise EngineError(
            f"latents do not match: A is {list(a.shape)}, B is {list(b.shape)} "
            "(they must come from the same model)"
        )


def morph_latents(
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    frames: int,
    layers: LayerGroup = "all",
    easing: Easing = "smooth",
    pingpong: bool = False,
) -> torch.Tensor:
    """Latents [N, num_ws, w_dim] moving from A to B in W+ (frame 0 is A, frame frames-1 is B).

    With a layer group only those ws move; the others stay A's (style mixing as an animation).
    """
    _check_pair(a, b)  # a, b: [num_ws, w_dim]
    num_ws = a.shape[0]
    mask = layer_mask(layers, num_ws).to(a.device)  # [num_ws]
    t = interpolation_times(frames, easing=easing, pingpong=pingpong).to(a.device, a.dtype)
    with torch.no_grad():
        w = t[:, None] * mask[None, :].to(a.dtype)  # [N, num_ws]
        # torch.lerp gives A exactly at weight 0 and B exactly at weight 1.
        out = torch.lerp(
            a.detach()[None].expand(len(t), -1, -1),
            b.detach().to(a.device, a.dtype)[None].expand(len(t), -1, -1),
            w[..., None].expand(-1, -1, a.shape[1]),
        )  # [N, num_ws, w_dim]
    return out


def mix_latents(a: torch.Tensor, b: torch.Tensor, *, layers: LayerGroup) -> torch.Tensor:
    """Style mixing [num_ws, w_dim]: A's latent with B's ws in the layer group."""
    _check_pair(a, b)  # a, b: [num_ws, w_dim]
    mask = layer_mask(layers, a.shape[0]).to(a.device)  # [num_ws]
    with torch.no_grad():
        return torch.where(mask[:, None], b.detach().to(a.device, a.dtype), a.detach())


def _to_uint8(img: torch.Tensor) -> torch.Tensor:
    # img: [B, 3, H, W] in ~[-1, 1] -> [B, H, W, 3] uint8
    x = ((img.float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return x.permute(0, 2, 3, 1)


def tour_latents(latents: list[torch.Tensor], *, frames: int, layers: LayerGroup = "all",
                 easing: Easing = "smooth") -> torch.Tensor:
    """Latents [N, num_ws, w_dim] through every latent in turn and back to the first: ``frames``
    per leg, each leg's last frame left out (the next leg starts there), so the result loops."""
    if len(latents) < 2:
        raise EngineError("a tour needs at least two latents")
    legs = [morph_latents(a, b, frames=frames, layers=layers, easing=easing)[:-1]
            for a, b in zip(latents, [*latents[1:], latents[0]], strict=True)]
    return torch.cat(legs)


def render_frames(
    G: Generator,
    ws: torch.Tensor,
    *,
    batch_size: int = 8,
    noise_mode: NoiseMode = "const",
    progress: ProgressFn | None = None,
) -> np.ndarray:
    """Render latents [N, num_ws, w_dim] to frames uint8 [N, H, W, 3] in batches on G's device.

    Calls ``progress(done_frames, N, {"stage": "render"})`` after each batch.
    """
    if not isinstance(ws, torch.Tensor) or ws.ndim != 3 or tuple(ws.shape[1:]) != (
        G.num_ws, G.w_dim
    ):
        shape = list(ws.shape) if isinstance(ws, torch.Tensor) else type(ws).__name__
        raise EngineError(f"latents must be [N, {G.num_ws}, {G.w_dim}] for this model, got {shape}")
    if len(ws) == 0:
        raise EngineError("no frames to render")
    if batch_size < 1:
        raise EngineError(f"batch_size must be at least 1, got {batch_size}")
    param = next(G.parameters())
    total = len(ws)
    res = G.resolution
    out = np.empty((total, res, res, 3), dtype=np.uint8)  # [N, H, W, 3]
    with torch.inference_mode():
        for start in range(0, total, batch_size):
            stop = min(start + batch_size, total)
            batch = ws[start:stop].to(param.device, param.dtype)  # [B, num_ws, w_dim]
            img = G.synthesis(batch, noise_mode=noise_mode)  # [B, 3, H, W]
            out[start:stop] = _to_uint8(img).cpu().numpy()
            if progress is not None:
                progress(stop, total, {"stage": "render"})
    return out
