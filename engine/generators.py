"""Resolve ``--model NAME|PATH|demo|auto`` to a ready generator, stamped with its model id."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from engine import weights
from engine.checkpoints import build_generator, content_hash, load_checkpoint
from engine.errors import EngineError
from engine.stylegan2 import Generator, GeneratorConfig

__all__ = [
    "DEMO_LABEL",
    "LoadedGenerator",
    "build_demo_generator",
    "configure_cuda",
    "load_generator",
    "resolve_device",
]

DEMO_LABEL = "demo model (random weights, not a face model)"
DEMO_SEED = 20261125
_DEMO_CONFIG = GeneratorConfig(
    z_dim=512, w_dim=512, resolution=64,
    channels={4: 128, 8: 128, 16: 64, 32: 48, 64: 32},
)


@dataclass(frozen=True)
class LoadedGenerator:
    G: Generator
    name: str  # what the user asked for ("demo", a manifest name, a file name)
    model_id: str  # stamped on every latent: "sg2-" + first 16 hex of the content hash
    content_hash: str
    is_demo: bool

    @property
    def label(self) -> str:
        return DEMO_LABEL if self.is_demo else self.name


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is a clear error.

    A CUDA device gets the engine's GPU settings (:func:`configure_cuda`)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise EngineError("--device cuda was asked for, but no CUDA GPU is available")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise EngineError(f"unknown device {device!r}: use auto, cpu or cuda[:N]") from None
    if dev.type == "cuda":
        configure_cuda()
    return dev


def configure_cuda() -> None:
    """The engine's settings on NVIDIA GPUs: TF32 tensor cores for float32 matmuls and convolutions
    (about 3e-4 relative error per product, far under what a picture shows) and cuDNN autotuning
    for the few shapes the engine runs again and again."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True


def build_demo_generator(*, seed: int = DEMO_SEED) -> Generator:
    """A small StyleGAN2 with deterministic random weights: no download, fast on CPU."""
    gen = torch.Generator().manual_seed(seed)
    G = Generator(_DEMO_CONFIG)
    with torch.no_grad():
        for name, p in sorted(G.named_parameters()):
            if name.endswith("affine.bias"):
                p.fill_(1.0)
            elif name.endswith("noise_strength"):
                p.fill_(0.1)
            elif name.endswith(".bias"):
                p.zero_()
            elif name.startswith("mapping."):
                p.copy_(torch.randn(p.shape, generator=gen) / G.cfg.mapping_lr_mul)
            elif name.endswith("torgb.weight"):
                # Keep the random image in a sensible range: ~unit variance per output.
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=gen))
        for name, b in sorted(G.named_buffers()):
            if name.endswith("noise_const"):
                b.copy_(torch.randn(b.shape, generator=gen))
        z = torch.randn(4096, G.cfg.z_dim, generator=gen)
        G.mapping.w_avg.copy_(G.mapping(z)[:, 0].mean(0))
    return G.eval().requires_grad_(False)


def _model_id(digest: str) -> str:
    return "sg2-" + digest[:16]


def load_generator(
    model: str = "auto", *, device: torch.device | str = "cpu", home: Path | None = None
) -> LoadedGenerator:
    """``demo``; ``auto`` (real FFHQ weights when cached, else demo); a manifest name; a path."""
    if model == "auto":
        model = weights.DEFAULT_GENERATOR if weights.find(weights.DEFAULT_GENERATOR, home=home) else "demo"
    if model == "demo":
        G = build_demo_generator().to(device)
        digest = content_hash(G)
        return LoadedGenerator(G, "demo", _model_id(digest), digest, True)
    if model in weights.MANIFEST:
        if weights.MANIFEST[model].kind != "generator":
            raise EngineError(f"{model} is not a generator")
        path = weights.locate(model, home=home)
    else:
        path = Path(model).expanduser()
        if not path.exists():
            names = ", ".join(n for n, a in weights.MANIFEST.items() if a.kind == "generator")
            raise EngineError(f"unknown model {model!r}: give a checkpoint file, 'demo', or {names}")
    G = build_generator(load_checkpoint(path), device=device)
    digest = content_hash(G)
    return LoadedGenerator(G, model if model in weights.MANIFEST else path.name,
                           _model_id(digest), digest, False)

