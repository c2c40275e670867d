"""One function per user-facing operation, with its one set of defaults.

The CLI commands (:mod:`engine.commands`, :mod:`engine.edit_commands`) and the worker's job
handlers (:mod:`engine.runner`) both call these; what differs between them is only I/O (files on
disk vs rows and media keys).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from engine.align import AlignedFace
from engine.clip_model import ClipModel
from engine.directions import ChannelTable, text_to_style_delta
from engine.edit import (
    DEFAULT_EDIT_STEPS,
    GLOBAL_STRENGTH,
    OPTIMIZE_STRENGTH,
    OptimizeResult,
    edit_optimize,
    optimize_l2_weight,
    render_global_edit,
)
from engine.encoder import Encoder, encoder_input
from engine.generators import LoadedGenerator
from engine.identity import IdentityLoss
from engine.images import pil_to_tensor
from engine.invert import DEFAULT_STEPS, ENCODER_LR, ENCODER_STEPS, InversionResult, invert
from engine.morph import Easing, LayerGroup, morph_latents, render_frames, tour_latents
from engine.perceptual import LPIPS
from engine.progress import ProgressFn, no_progress
from engine.stylegan2 import Generator
from storage.specs import MORPH_FRAMES

__all__ = [
    "BETA",
    "GlobalEdit",
    "encode",
    "global_edit",
    "invert_faces",
    "inversion_quality",
    "morph_frames",
    "neutral_prompt",
    "optimize_edit",
    "optimize_strength",
]

BETA = 0.1  # a global edit leaves alone the style channels less relevant to the text than this


def neutral_prompt(loaded: LoadedGenerator) -> str:
    """StyleCLIP's neutral text for this generator ("face" for face models)."""
    return "picture" if loaded.is_demo else "face"


def invert_faces(
    G: Generator, faces: Sequence[AlignedFace], *, perceptual: LPIPS,
    identity: IdentityLoss | None = None, encoder: Encoder | None = None, steps: int | None = None,
    optimize_noise: bool = False, compile: bool | None = None, progress: ProgressFn = no_progress,
    first_look: Callable[[torch.Tensor], None] | None = None,
) -> InversionResult:
    """W+ latents for aligned faces, inverted together (``steps`` None: the default).

    With an ``encoder``, its guess is the start: rendered and handed to ``first_look`` ([B, 3, R, R]
    in [-1, 1]) before the optimisation refines it in fewer steps by default."""
    targets = torch.cat([pil_to_tensor(face.image) for face in faces]).to(G.w_avg.device)  # [B, 3, R, R]
    if encoder is None:
        return invert(G, targets, perceptual=perceptual, identity=identity,
                      steps=steps or DEFAULT_STEPS, optimize_noise=optimize_noise, compile=compile,
                      progress=progress)
    return invert(G, targets, perceptual=perceptual, identity=identity, start=encode(encoder, targets),
                  lr=ENCODER_LR, steps=steps or ENCODER_STEPS, optimize_noise=optimize_noise,
                  compile=compile, first_look=first_look, progress=progress)


def encode(encoder: Encoder, images: torch.Tensor) -> torch.Tensor:
    """The encoder's latents [B, num_ws, w_dim] float32 for images [B, 3, R, R] in [-1, 1]."""
    x = encoder_input(images.to(encoder.latent_avg.device), encoder.cfg.input_size)
    cuda = x.device.type == "cuda"
    with torch.no_grad(), torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=cuda):
        return encoder(x)


def inversion_quality(res: InversionResult, i: int) -> dict[str, Any]:
    """How close the ``i``-th reconstruction came, as stored beside a face and in report.json."""
    quality = {"psnr": round(res.psnr[i], 3), "lpips": round(res.lpips[i], 5), "steps": res.steps,
               "seconds": round(res.seconds, 3)}
    if res.start_psnr:
        quality["encoder_psnr"] = round(res.start_psnr[i], 3)
    return quality


@dataclass(frozen=True)
class GlobalEdit:
    images: torch.Tensor  # [B, 3, H, W] in [-1, 1]
    delta: dict[str, torch.Tensor]  # per style layer, for renders at other strengths
    channels: int  # style channels the edit moves
    strength: float
    beta: float


def global_edit(
    G: Generator, ws: torch.Tensor, table: ChannelTable, clip: ClipModel, text: str, *,
    neutral: str, strength: float | None = None, beta: float | None = None,
) -> GlobalEdit:
    """StyleCLIP global directions: ws [B, num_ws, w_dim] moved towards ``text`` (from ``neutral``).
    None: the default; a negative ``strength`` reverses the edit."""
    strength = GLOBAL_STRENGTH if strength is None else float(strength)
    beta = BETA if beta is None else beta
    delta, kept = text_to_style_delta(table, clip.text_direction(text, neutral), beta=beta)
    images = render_global_edit(G, ws, delta, strength=strength)
    return GlobalEdit(images, delta, kept, strength, beta)


def optimize_strength(strength: float | None) -> float:
    """An optimisation edit's strength (None: the default); an EngineError unless positive."""
    strength = OPTIMIZE_STRENGTH if strength is None else float(strength)
    optimize_l2_weight(strength)
    return strength


def optimize_edit(
    G: Generator, ws: torch.Tensor, texts: Sequence[str], clip: ClipModel, *,
    strengths: Sequence[float | None], steps: int | None = None,
    identity: IdentityLoss | None = None, progress: ProgressFn = no_progress,
) -> OptimizeResult:
    """StyleCLIP latent optimisation: ws [B, num_ws, w_dim] towards one text each, each at its
    own strength (larger moves further)."""
    embeddings = torch.stack([clip.text_embedding(text) for text in texts])  # [B, D]
    l2 = [optimize_l2_weight(optimize_strength(s)) for s in strengths]
    return edit_optimize(G, ws, embeddings, encode=clip.encode_images,
                         steps=steps or DEFAULT_EDIT_STEPS, l2_weight=l2, identity=identity,
                         progress=progress)


def morph_frames(
    G: Generator, a: torch.Tensor, b: torch.Tensor, *, frames: int = MORPH_FRAMES,
    layers: LayerGroup = "all", easing: Easing = "smooth", pingpong: bool = False,
    more: Sequence[torch.Tensor] = (), progress: ProgressFn | None = None,
) -> np.ndarray:
    """The frames [N, H, W, 3] uint8 of an animation from latent ``a`` to ``b`` (each [num_ws, w_dim]);
    with ``more``, a loop from ``a`` through ``b`` and each of them back to ``a`` (``frames`` a leg)."""
    if more:
        ws = tour_latents([a, b, *more], frames=frames, layers=layers, easing=easing)
    else:
        ws = morph_latents(a, b, frames=frames, layers=layers, easing=easing, pingpong=pingpong)
    return render_frames(G, ws.to(G.w_avg.device), progress=progress)
