"""StyleCLIP text edits: latent optimisation, and rendering of global-direction edits."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.directions import apply_style_delta
from engine.errors import EngineError
from engine.identity import IdentityLoss
from engine.optim import adam_steps, pad_rows, padded_size
from engine.progress import ProgressFn, no_progress
from engine.stylegan2 import Generator, NoiseMode
from settings import EngineConfig

__all__ = [
    "DEFAULT_EDIT_STEPS",
    "GLOBAL_STRENGTH",
    "OPTIMIZE_STRENGTH",
    "OptimizeResult",
    "edit_optimize",
    "optimize_l2_weight",
    "render_global_edit",
]

DEFAULT_EDIT_STEPS = EngineConfig().edit_steps  # the one default: `[engine] edit_steps`

# Default strengths: a global edit's alpha (negative reverses it), and the optimisation's, which
# divides its L2 weight.
GLOBAL_STRENGTH = 4.0
OPTIMIZE_STRENGTH = 1.0
_L2_WEIGHT = 0.008  # at strength 1: keeps the face recognisable while the CLIP loss moves it

ImageEncoder = Callable[[torch.Tensor], torch.Tensor]


def optimize_l2_weight(strength: float) -> float:
    """The L2 weight that gives an optimisation edit ``strength`` (> 0; larger moves further)."""
    if not strength > 0:
        raise EngineError("the strength of an optimisation edit must be positive")
    return _L2_WEIGHT / strength


@dataclass
class OptimizeResult:
    latents: torch.Tensor  # [B, num_ws, w_dim], CPU
    images: torch.Tensor  # [B, 3, H, W] in [-1, 1], CPU
    clip_loss: list[list[float]]  # per reported step (every step on CPU), per edit: 1 - cos(image, text)
    seconds: float


def edit_optimize(
    G: Generator,
    source: torch.Tensor,
    text_embeddings: torch.Tensor,
    *,
    encode: ImageEncoder,
    steps: int = DEFAULT_EDIT_STEPS,
    lr: float = 0.1,
    l2_weight: float | Sequence[float] = _L2_WEIGHT,
    identity: IdentityLoss | None = None,
    identity_weight: float = 0.005,
    noise_mode: NoiseMode = "const",
    graph: bool | None = None,
    pad: bool | None = None,
    progress: ProgressFn = no_progress,
) -> OptimizeResult:
    """Optimise W+ latents from ``source`` [B, num_ws, w_dim] towards texts [B, D] (unit).

    Loss per edit: CLIP cosine distance to its text + ``l2_weight`` * ||w - w_src||^2 (+ the
    identity loss to the source render when given). Larger ``l2_weight`` keeps the result
    closer to the source (weaker edit); smaller lets it move further; one per edit, or one for
    all. ``pad``: as for
    :func:`engine.invert.invert` (copies of the last edit up to ``batch_bucket(B)``; CUDA default).
    """
    if source.ndim != 3 or source.shape[1:] != (G.num_ws, G.w_dim):
        raise ValueError(f"source must be [B, {G.num_ws}, {G.w_dim}], got {list(source.shape)}")
    if text_embeddings.shape[0] != source.shape[0]:
        raise ValueError("one text embedding per source latent")
    start = time.perf_counter()
    device = G.w_avg.device
    src = source.to(device, torch.float32)
    texts = F.normalize(text_embeddings.to(device, torch.float32), dim=-1)
    b = src.shape[0]
    l2 = torch.as_tensor(l2_weight, dtype=torch.float32).to(device).expand(b).contiguous()  # [B]
    n = padded_size(b, device, pad)
    src, texts, l2 = pad_rows(src, n), pad_rows(texts, n), pad_rows(l2, n)
    ws = src.clone().requires_grad_(True)
    identity_to = None
    if identity is not None:
        with torch.no_grad():
            identity_to = identity.against(G.synthesis(src, noise_mode=noise_mode))
    last: dict[str, torch.Tensor] = {}  # the latest CLIP loss (a graph's output when replayed)

    def loss_fn() -> torch.Tensor:  # [B]
        images = G.synthesis(ws, noise_mode=noise_mode)
        clip_loss = 1.0 - (encode(images) * texts).sum(-1)  # [B]
        last["clip"] = clip_loss.detach()
        loss = clip_loss + l2 * (ws - src).square().sum(dim=[1, 2])
        if identity_to is not None:
            loss = loss + identity_weight * identity_to(images)
        return loss

    history: list[list[float]] = []

    def on_step(step: int, _: torch.Tensor) -> None:
        history.append([float(v) for v in last["clip"][:b]])
        progress(step, steps, {"clip_loss": sum(history[-1]) / len(history[-1])})

    adam_steps([ws], loss_fn, steps=steps, lr=lr, on_step=on_step,
               report_every=10 if device.type == "cuda" else 1, graph=graph)
    with torch.no_grad():
        final = G.synthesis(ws.detach()[:b], noise_mode=noise_mode).clamp(-1, 1)
    return OptimizeResult(latents=ws.detach()[:b].cpu(), images=final.cpu(), clip_loss=history,
                          seconds=time.perf_counter() - start)


@torch.no_grad()
def render_global_edit(
    G: Generator, ws: torch.Tensor, delta: dict[str, torch.Tensor], *, strength: float,
    noise_mode: NoiseMode = "const",
) -> torch.Tensor:
    """Render ws [B, num_ws, w_dim] with s' = s + strength * delta_s. -> [B, 3, H, W]."""
    styles = G.synthesis.styles(ws.to(G.w_avg.device))
    if strength != 0:
        styles = apply_style_delta(styles, delta, strength=strength)
    return G.synthesis.from_styles(styles, noise_mode=noise_mode).clamp(-1, 1)
