"""Identity loss: 1 - cosine similarity of face-recognition embeddings.

Used (optionally) during inversion so that a reconstruction keeps the person's identity. The
real embedding network is facenet-pytorch's InceptionResnetV1 trained on VGGFace2, loaded from
the weights cache without ever letting facenet-pytorch download anything. Without that file
:func:`load_identity` returns ``None``: the identity term is simply skipped.

Inputs are FFHQ-aligned faces; face recognisers expect a tighter crop, so the loss takes the
central region (rows 35:223, columns 32:220 of a 256 image, scaled to the input size, as common
StyleGAN identity losses do) and resizes it to the network's input size (160 for FaceNet).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Self

import torch
import torch.nn.functional as F
from torch import nn

from engine import weights
from engine.checkpoints import load_tensor_file
from engine.errors import CheckpointError

__all__ = [
    "FACENET_ASSET",
    "IdentityLoss",
    "demo_identity",
    "identity_from_file",
    "load_identity",
]

FACENET_ASSET = "facenet-vggface2"
DEMO_SEED = 20240602

# Face box inside an FFHQ-aligned 256x256 image: (top, bottom, left, right), end-exclusive.
_CROP_256 = (35, 223, 32, 220)


class IdentityLoss(nn.Module):
    """``forward(x, y) -> [B]``: 1 - cos(embed(crop(x)), embed(crop(y))), in ``[0, 2]``.

    ``net`` maps ``[B, 3, input_size, input_size]`` images (roughly in ``[-1, 1]``) to
    embeddings ``[B, D]``. Parameters are frozen; gradients flow to the inputs.
    """

    def __init__(
        self,
        net: nn.Module,
        *,
        input_size: int = 160,
        input_scale: float = 1.0,
        name: str,
        is_demo: bool,
    ) -> None:
        super().__init__()
        if input_size < 8:
            raise ValueError(f"input_size must be >= 8, got {input_size}")
        self.net = net
        self.input_size = input_size
        self.input_scale = input_scale
        self.name = name
        self.is_demo = is_demo
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> Self:
        """Stays in eval mode (no dropout, fixed batch-norm statistics) whatever a parent does."""
        return super().train(False)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Unit embeddings ``[B, D]`` of the central face crop of ``x`` ``[B, 3, H, W]``."""
        if x.ndim != 4 or x.shape[1] != 3 or x.shape[0] == 0:
            raise ValueError(f"expected images [B, 3, H, W], got {tuple(x.shape)}")
        face = _face_crop(x, self.input_size) * self.input_scale  # [B, 3, S, S]
        e = self.net(face)  # [B, D]
        return F.normalize(e.flatten(1), dim=1)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape != y.shape:
            raise ValueError(f"image batches differ in shape: {tuple(x.shape)} vs {tuple(y.shape)}")
        b = x.shape[0]
        e = self.embed(torch.cat([x, y]))  # [2B, D]
        return 1.0 - (e[:b] * e[b:]).sum(dim=1)  # [B]

    def against(self, y: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """``x -> forward(x, y)`` with ``y``'s embedding computed once (a fixed target)."""
        with torch.no_grad():
            ey = self.embed(y).float()  # [B, D]

        def distance(x: torch.Tensor) -> torch.Tensor:
            if x.shape != y.shape:
                raise ValueError(f"image batches differ in shape: {tuple(x.shape)} vs {tuple(y.shape)}")
            return 1.0 - (self.embed(x).float() * ey).sum(dim=1)  # [B]

        return distance


def _face_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """Crop the FFHQ face box (scaled to ``x``'s size) and resize it to ``size`` x ``size``."""
    h, w = x.shape[-2:]
    top, bottom, left, right = _CROP_256
    r0, r1 = round(top * h / 256), round(bottom * h / 256)
    c0, c1 = round(left * w / 256), round(right * w / 256)
    face = x[:, :, r0:r1, c0:c1]  # [B, 3, ~0.73H, ~0.73W]
    if face.shape[-2:] == (size, size):
        return face
    if face.shape[-2] >= size and face.shape[-1] >= size:
        return F.interpolate(face, size=(size, size), mode="area")
    return F.interpolate(face, size=(size, size), mode="bilinear", align_corners=False)


class _DemoEmbedding(nn.Module):
    """A tiny CNN: [B, 3, 64, 64] -> [B, 128]. Keeps spatial layout (no global pooling), so
    different faces get clearly different embeddings even with random weights."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 16, kernel_size=3, stride=2, padding=1),  # [B, 16, 32, 32]
            nn.ReLU(),
            nn.Conv2d(16, 32, kernel_size=3, stride=2, padding=1),  # [B, 32, 16, 16]
            nn.ReLU(),
            nn.Conv2d(32, 32, kernel_size=3, stride=2, padding=1),  # [B, 32, 8, 8]
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(4),  # [B, 32, 4, 4]
        )
        self.head = nn.Linear(32 * 4 * 4, 128)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).flatten(1))  # [B, 128]


def demo_identity(*, seed: int = DEMO_SEED) -> IdentityLoss:
    """A seeded, untrained stand-in for offline tests (``is_demo = True``).

    It is a distance between images, not between people: do not present it as identity.
    """
    with torch.random.fork_rng(devices=[]):
        net = _DemoEmbedding()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu", generator=g)
                if m.bias is not None:
                    m.bias.uniform_(-0.05, 0.05, generator=g)
    return IdentityLoss(net, input_size=64, name="demo-identity", is_demo=True)


def identity_from_file(path: Path) -> IdentityLoss:
    """FaceNet (InceptionResnetV1, VGGFace2) identity loss from a facenet-pytorch state dict.

    The classifier (``logits.*``) is dropped; every other key must match.
    """
    from facenet_pytorch import InceptionResnetV1

    loaded = load_tensor_file(path, what="FaceNet weights")
    state = {k: v for k, v in loaded.items() if not k.startswith("logits.")}
    with torch.random.fork_rng(devices=[]):  # the init is overwritten; keep the global RNG
        net = InceptionResnetV1(pretrained=None, classify=False)  # never downloads
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[0] if str(e) else "state dict mismatch"
        raise CheckpointError(f"{path} is not an InceptionResnetV1 state dict: {first}") from e
    # facenet-pytorch standardises pixels as (p - 127.5) / 128; ours are (p - 127.5) / 127.5.
    return IdentityLoss(
        net, input_size=160, input_scale=127.5 / 128.0, name="facenet-vggface2", is_demo=False
    )


def load_identity(
    *, home: Path | None = None, device: torch.device | str = "cpu"
) -> IdentityLoss | None:
    """The FaceNet identity loss when its weights are cached under ``home``, else ``None``."""
    path = weights.find(FACENET_ASSET, home=home)
    if path is None:
        return None
    return identity_from_file(path).to(device).eval()
