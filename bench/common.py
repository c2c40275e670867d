"""What bench.perf and bench.experiments share: the networks, targets and timing they measure with."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from engine.identity import IdentityLoss
from engine.perceptual import LPIPS
from engine.stylegan2 import Generator, GeneratorConfig

__all__ = ["Row", "random_generator", "random_losses", "random_targets", "timed"]

Row = dict[str, Any]


def random_generator(res: int, device: torch.device, seed: int = 0) -> Generator:
    torch.manual_seed(seed)
    cfg = GeneratorConfig.from_channel_base(z_dim=512, w_dim=512, resolution=res, channel_base=32768,
                                            channel_max=512, conv_clamp=256.0)
    return Generator(cfg).to(device).eval().requires_grad_(False)


def random_targets(G: Generator, seeds: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    dev = G.w_avg.device
    z = torch.stack([torch.randn(G.cfg.z_dim, generator=torch.Generator().manual_seed(s)) for s in seeds])
    with torch.no_grad():
        ws = G.mapping(z.to(dev))  # [N, num_ws, 512], psi 1
        return ws, G.synthesis(ws).clamp(-1, 1)


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def random_losses(dev: torch.device) -> tuple[LPIPS, IdentityLoss]:
    from facenet_pytorch import InceptionResnetV1

    torch.manual_seed(2)
    lpips = LPIPS(resize_to=256).to(dev)  # VGG16 trunk, random weights
    net = InceptionResnetV1(pretrained=None, classify=False)
    identity = IdentityLoss(net, input_size=160, name="facenet (random)", is_demo=True).to(dev).eval()
    return lpips, identity
