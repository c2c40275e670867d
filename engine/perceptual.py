"""LPIPS perceptual distance (v0.1, VGG16 trunk) in plain PyTorch.

The maths follows Zhang et al.'s ``lpips`` package (v0.1): a fixed input scaling layer, VGG16
``features`` tapped after relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3, channel-wise unit
normalisation, squared difference, a learned non-negative 1x1 linear head per tap, spatial mean,
sum over taps. We do not use the package's ``LPIPS`` class at run time (it would try to download
torchvision weights); we only read its shipped linear-head file ``weights/v0.1/vgg.pth``.

The trunk's parameter names are torchvision's (``features.N.weight``), so the cached
``vgg16-397923af.pth`` state dict loads as it is. Without that file, :func:`load_perceptual`
returns a small seeded stand-in (``is_demo = True``) that behaves like a distance but is not
calibrated to human judgement.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Self

import torch
import torch.nn.functional as F
from torch import nn

from engine import weights
from engine.checkpoints import load_tensor_file
from engine.errors import CheckpointError, WeightsMissingError

__all__ = [
    "LPIPS",
    "VGG16_CHANNELS",
    "VGG16_CONVS",
    "build_lpips_vgg",
    "demo_lpips",
    "load_lin_state",
    "load_perceptual",
    "load_vgg_state",
    "lpips_from_files",
]

VGG16_CHANNELS: tuple[int, ...] = (64, 128, 256, 512, 512)
VGG16_CONVS: tuple[int, ...] = (2, 2, 3, 3, 3)
VGG16_ASSET = "vgg16-imagenet"
DEMO_SEED = 20240601

_DEMO_CHANNELS: tuple[int, ...] = (8, 16, 32, 32, 32)
_DEMO_CONVS: tuple[int, ...] = (1, 1, 1, 1, 1)
_DEMO_RESIZE = 128
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)
_EPS = 1e-10


class LPIPS(nn.Module):
    """LPIPS distance between two image batches: ``forward(x, y) -> [B]``.

    Inputs are ``[B, 3, H, W]`` in ``[-1, 1]``. Images whose larger side exceeds ``resize_to``
    are area-resized (aspect kept) before the trunk. Parameters are frozen; gradients still flow
    to the inputs, so this works as a loss for latent optimisation.

    ``channels`` / ``convs_per_stage`` give the width and depth of the five VGG-style stages; the
    defaults are VGG16's, for which ``features`` has torchvision's exact layer indices.
    """

    shift: torch.Tensor  # [1, 3, 1, 1]
    scale: torch.Tensor  # [1, 3, 1, 1]

    def __init__(
        self,
        *,
        channels: Sequence[int] = VGG16_CHANNELS,
        convs_per_stage: Sequence[int] = VGG16_CONVS,
        resize_to: int | None = 256,
        name: str = "lpips-vgg16",
        is_demo: bool = False,
    ) -> None:
        super().__init__()
        if len(channels) != len(convs_per_stage) or not channels:
            raise ValueError("channels and convs_per_stage must be non-empty and equally long")
        if any(c < 1 for c in channels) or any(n < 1 for n in convs_per_stage):
            raise ValueError("channel widths and conv counts must be positive")
        if resize_to is not None and resize_to < 16:
            raise ValueError(f"resize_to must be >= 16 (or None), got {resize_to}")
        self.channels = tuple(int(c) for c in channels)
        self.resize_to = resize_to
        self.name = name
        self.is_demo = is_demo
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1), persistent=False)

        layers: list[nn.Module] = []
        taps: list[int] = []
        c_in = 3
        for stage, (c_out, n) in enumerate(zip(self.channels, convs_per_stage, strict=True)):
            if stage > 0:
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            for _ in range(n):
                layers.append(nn.Conv2d(c_in, c_out, kernel_size=3, padding=1))
                layers.append(nn.ReLU(inplace=True))
                c_in = c_out
            taps.append(len(layers) - 1)  # index of the stage's last ReLU
        self.features = nn.Sequential(*layers)
        self._taps = tuple(taps)
        # One non-negative weight per channel of each tap (lpips' 1x1 conv, no bias). [C_k]
        self.lin = nn.ParameterList(nn.Parameter(torch.full((c,), 1.0 / c)) for c in self.channels)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> Self:
        """Stays in eval mode: the metric is fixed, whatever a parent module is set to."""
        return super().train(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        _check_pair(x, y)
        b = x.shape[0]
        feats = self._features(torch.cat([x, y]))  # one pass over [2B, ...]
        return self._distance([f[:b] for f in feats], [f[b:] for f in feats])

    def against(self, y: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """``x -> forward(x, y)`` with ``y``'s features computed once (a fixed target)."""
        with torch.no_grad():
            target = self._features(y)

        def distance(x: torch.Tensor) -> torch.Tensor:
            _check_pair(x, y)
            return self._distance(self._features(x), target)

        return distance

    def _features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Unit-normalised activations at each stage's last ReLU. x: [N, 3, H, W] in [-1, 1]."""
        h = (self._resize(x) - self.shift) / self.scale
        # Channels-last: oneDNN on CPU and cuDNN's tensor-core kernels both want NHWC.
        h = h.contiguous(memory_format=torch.channels_last)
        feats: list[torch.Tensor] = []
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i == self._taps[len(feats)]:
                feats.append(_unit_normalize(h))  # [N, C, h, w]
                if len(feats) == len(self._taps):
                    break
        return feats

    def _distance(self, fx: list[torch.Tensor], fy: list[torch.Tensor]) -> torch.Tensor:
        total = fx[0].new_zeros(fx[0].shape[0], dtype=torch.float32)  # [B]
        for k, (a, b) in enumerate(zip(fx, fy, strict=True)):
            d = (a.float() - b.float()).square().mean(dim=(2, 3))  # [B, C]
            # mean_hw(w . d) == w . mean_hw(d): apply the linear head after the spatial mean.
            total = total + d @ self.lin[k]
        return total

    def _resize(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if self.resize_to is None or max(h, w) <= self.resize_to:
            return x
        s = self.resize_to / max(h, w)
        size = (max(1, round(h * s)), max(1, round(w * s)))
        return F.interpolate(x, size=size, mode="area")


def _unit_normalize(h: torch.Tensor) -> torch.Tensor:
    """lpips' ``h / (||h||_channels + eps)``, with a finite gradient where ``h`` is all zero."""
    # Clamping at eps**2 changes nothing visible (such features are ~0 anyway) but keeps sqrt's
    # gradient finite at all-zero pixels instead of relying on the preceding ReLU to mask a NaN.
    # (torch.linalg.vector_norm would do too, but is ~40x slower over dim 1 on CPU.)
    sq = h.square().sum(dim=1, keepdim=True).clamp_min(_EPS * _EPS)  # [N, 1, h, w]
    return h / (sq.sqrt() + _EPS)


def _check_pair(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected images [B, 3, H, W], got {tuple(x.shape)}")
    if x.shape != y.shape:
        raise ValueError(f"image batches differ in shape: {tuple(x.shape)} vs {tuple(y.shape)}")
    if x.shape[0] == 0:
        raise ValueError("empty image batch")


def build_lpips_vgg(
    vgg_state: Mapping[str, torch.Tensor],
    lin_state: Mapping[str, torch.Tensor],
    *,
    resize_to: int | None = 256,
) -> LPIPS:
    """Real LPIPS from a torchvision vgg16 state dict and lpips' ``vgg.pth`` linear heads.

    ``vgg_state`` keys are ``features.N.weight`` / ``features.N.bias`` (classifier keys are
    ignored); ``lin_state`` keys are ``lin0.model.1.weight`` ... ``lin4.model.1.weight``.
    Raises :class:`CheckpointError` when a key is missing or a shape does not fit.
    """
    with torch.random.fork_rng(devices=[]):  # the init is overwritten; keep the global RNG
        model = LPIPS(resize_to=resize_to)
    trunk = {k: v for k, v in vgg_state.items() if k.startswith("features.")}
    own = model.features.state_dict()
    missing = sorted(set(f"features.{k}" for k in own) - set(trunk))
    if missing:
        raise CheckpointError(f"VGG16 weights lack {len(missing)} keys, e.g. {missing[0]}")
    for key, value in own.items():
        got = trunk[f"features.{key}"]
        if got.shape != value.shape:
            raise CheckpointError(
                f"VGG16 weight features.{key} has shape {tuple(got.shape)}, "
                f"expected {tuple(value.shape)}"
            )
    model.features.load_state_dict({k: trunk[f"features.{k}"].float() for k in own})

    with torch.no_grad():
        for i, c in enumerate(model.channels):
            key = f"lin{i}.model.1.weight"
            if key not in lin_state:
                raise CheckpointError(f"LPIPS linear weights lack {key}")
            w = lin_state[key]
            if w.shape != (1, c, 1, 1):
                raise CheckpointError(
                    f"LPIPS linear weight {key} has shape {tuple(w.shape)}, expected (1, {c}, 1, 1)"
                )
            model.lin[i].copy_(w.reshape(c).float())
    model.name = "lpips-vgg16"
    model.is_demo = False
    return model


def demo_lpips(*, seed: int = DEMO_SEED, resize_to: int | None = _DEMO_RESIZE) -> LPIPS:
    """A small, seeded, untrained LPIPS-shaped distance for offline use and tests.

    Same maths as the real one on a thin VGG-like trunk (channels 8/16/32/32/32, one conv per
    stage; Kaiming init) with uniform positive linear heads. It looks at images area-resized to
    at most ``resize_to`` (128 by default, to stay fast on CPU). The same seed gives the same
    weights, and the global RNG is left untouched.
    """
    with torch.random.fork_rng(devices=[]):
        model = LPIPS(
            channels=_DEMO_CHANNELS,
            convs_per_stage=_DEMO_CONVS,
            resize_to=resize_to,
            name="demo-lpips",
            is_demo=True,
        )
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.features:
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu", generator=g)
                if m.bias is not None:
                    m.bias.uniform_(-0.05, 0.05, generator=g)
        for w in model.lin:
            w.uniform_(0.5, 1.5, generator=g).div_(w.numel())
    return model


def load_vgg_state(path: Path) -> dict[str, torch.Tensor]:
    """Read a torchvision vgg16 state dict (``weights_only``; tensors on CPU)."""
    return load_tensor_file(path, what="VGG16")


def _lpips_lin_path() -> Path | None:
    spec = importlib.util.find_spec("lpips")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        path = Path(root) / "weights" / "v0.1" / "vgg.pth"
        if path.is_file():
            return path
    return None


def load_lin_state(path: Path | None = None) -> dict[str, torch.Tensor]:
    """Read LPIPS v0.1 VGG linear heads; by default the file shipped in the lpips package."""
    if path is None:
        path = _lpips_lin_path()
        if path is None:
            raise WeightsMissingError(
                "LPIPS linear weights not found: install lpips==0.1.4 "
                "(it ships lpips/weights/v0.1/vgg.pth)"
            )
    return load_tensor_file(path, what="LPIPS linear weights")


def lpips_from_files(
    *, vgg_path: Path, lin_path: Path | None = None, resize_to: int | None = 256
) -> LPIPS:
    """Real LPIPS from explicit files (``lin_path`` defaults to the lpips package's)."""
    return build_lpips_vgg(
        load_vgg_state(vgg_path), load_lin_state(lin_path), resize_to=resize_to
    )


def load_perceptual(
    *, home: Path | None = None, device: torch.device | str = "cpu"
) -> LPIPS:
    """Real LPIPS when the VGG16 weights are cached under ``home``, else :func:`demo_lpips`.

    Check ``.is_demo`` on the result before presenting numbers as LPIPS.
    """
    path = weights.find(VGG16_ASSET, home=home)
    model = demo_lpips() if path is None else lpips_from_files(vgg_path=path)
    return model.to(device).eval()
