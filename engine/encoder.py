"""An e4e-family encoder: aligned face [B, 3, 256, 256] in [-1, 1] -> W+ latent [B, num_ws, w_dim].

The architecture of e4e (Tov et al., "Designing an Encoder for StyleGAN Image Manipulation",
2021; their ``Encoder4Editing`` over the pSp framework) in plain PyTorch, with their parameter
names so that their checkpoints load as they are (:mod:`engine.encoder_io`):

* a ResNet-IR body (IR-SE 50 for e4e: 3, 4, 14 and 3 units of 64, 128, 256, 512 channels, each
  unit BN-conv-PReLU-conv-BN(-SE) plus a shortcut, the first unit of each stage at stride 2);
* a feature pyramid over the stage outputs c1 (1/4 size), c2 (1/8), c3 (1/16):
  ``p2 = up(c3) + lat1(c2)``, ``p1 = up(p2) + lat2(c1)`` (bilinear, corners aligned);
* one head per W+ layer (stride-2 convs down to 1x1, then an equalised linear layer): head 0 reads
  c3 and gives ``w``, used for every layer; head ``i >= 1`` adds an offset to layer ``i``, read
  from c3 (layers 1-2), p2 (3-6) or p1 (7 on);
* plus ``latent_avg`` (pSp's ``start_from_latent_avg``): the prediction is an offset from it.

:class:`EncoderConfig` makes smaller variants (fewer units and channels, fewer ws, a smaller
input) for tests and small generators; its defaults are e4e's.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["COARSE_END", "MIDDLE_END", "Encoder", "EncoderConfig", "encoder_input"]

COARSE_END = 3  # layers [0, 3) read c3
MIDDLE_END = 7  # layers [3, 7) read p2, the rest p1


@dataclass(frozen=True)
class EncoderConfig:
    """The encoder's architecture; the defaults are e4e's IR-SE 50 for a 1024 px generator."""

    num_ws: int = 18
    w_dim: int = 512
    input_size: int = 256  # side of the images the encoder is trained on
    stage_units: tuple[int, ...] = (3, 4, 14, 3)
    stage_channels: tuple[int, ...] = (64, 128, 256, 512)
    head_channels: int = 512
    se: bool = True  # squeeze-and-excitation in every unit (IR-SE, as e4e); else plain IR
    se_reduction: int = 16

    def __post_init__(self) -> None:
        if len(self.stage_units) != 4 or len(self.stage_channels) != 4:
            raise ValueError("the body has exactly four stages (stage_units, stage_channels)")
        if min(self.stage_units) < 1 or min(self.stage_channels) < 1:
            raise ValueError("every stage needs at least one unit and one channel")
        if any(a == b for a, b in zip(self.stage_channels, self.stage_channels[1:], strict=False)):
            # a file tells its stages apart by their widths (the strides leave no trace in it)
            raise ValueError("consecutive stages must differ in width")
        size = self.input_size
        if size < 32 or size & (size - 1):
            raise ValueError(f"input_size must be a power of two >= 32, got {size}")
        if self.num_ws < 1 or self.w_dim < 1 or self.head_channels < 1:
            raise ValueError("num_ws, w_dim and head_channels must be positive")
        if self.se and min(self.stage_channels) < self.se_reduction:
            raise ValueError("se_reduction is larger than a stage's channel count")

    @property
    def head_convs(self) -> tuple[int, int, int]:
        """Stride-2 convs of the coarse, middle and fine heads: log2 of c3's, p2's, p1's side."""
        c3 = self.input_size // 16
        return int(math.log2(c3)), int(math.log2(c3)) + 1, int(math.log2(c3)) + 2

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> EncoderConfig:
        data = json.loads(text)
        for key in ("stage_units", "stage_channels"):
            data[key] = tuple(int(v) for v in data[key])
        return cls(**data)


def encoder_input(images: torch.Tensor, size: int) -> torch.Tensor:
    """Images [B, 3, H, H] in [-1, 1] at the encoder's input side ``size`` (area-averaged down,
    bilinear up). e4e's own pipeline resizes aligned 1024 px faces to 256 with PIL's bilinear
    filter; area averaging is its alias-free equivalent for a 4x reduction."""
    if images.ndim != 4 or images.shape[1] != 3 or images.shape[2] != images.shape[3]:
        raise ValueError(f"images must be [B, 3, H, H], got {list(images.shape)}")
    side = images.shape[-1]
    if side == size:
        return images
    mode = "area" if side > size else "bilinear"
    kwargs = {} if mode == "area" else {"align_corners": False}
    return F.interpolate(images, size=(size, size), mode=mode, **kwargs)


class _SEModule(nn.Module):
    """Squeeze-and-excitation: channel gates from the global average (no biases, as ArcFace)."""

    def __init__(self, channels: int, reduction: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, channels // reduction, 1, bias=False)
        self.fc2 = nn.Conv2d(channels // reduction, channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = F.adaptive_avg_pool2d(x, 1)  # [B, C, 1, 1]
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(gate))))


class _Shortcut(nn.Module):
    """The identity at stride ``s`` (e4e's ``MaxPool2d(1, s)``: a subsampling, no weights)."""

    def __init__(self, stride: int) -> None:
        super().__init__()
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :, :: self.stride, :: self.stride] if self.stride > 1 else x


class _Unit(nn.Module):
    """One bottleneck_IR(_SE) unit: ``res_layer(x) + shortcut_layer(x)``."""

    def __init__(self, c_in: int, c_out: int, stride: int, *, se: bool, reduction: int) -> None:
        super().__init__()
        self.shortcut_layer: nn.Module
        if c_in == c_out:
            self.shortcut_layer = _Shortcut(stride)
        else:
            self.shortcut_layer = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
        layers: list[nn.Module] = [
            nn.BatchNorm2d(c_in),
            nn.Conv2d(c_in, c_out, 3, 1, 1, bias=False),
            nn.PReLU(c_out),
            nn.Conv2d(c_out, c_out, 3, stride, 1, bias=False),
            nn.BatchNorm2d(c_out),
        ]
        if se:
            layers.append(_SEModule(c_out, reduction))
        self.res_layer = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res_layer(x) + self.shortcut_layer(x)


class _EqualLinear(nn.Module):
    """rosinality's ``EqualLinear`` (lr_mul 1, no activation): weight scaled by 1/sqrt(in) at run
    time."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(c_out, c_in))
        self.bias = nn.Parameter(torch.zeros(c_out))
        self.scale = 1.0 / math.sqrt(c_in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.scale, self.bias)


class _StyleHead(nn.Module):
    """e4e's ``GradualStyleBlock``: ``n`` stride-2 3x3 convs with LeakyReLU(0.01) down to 1x1,
    then an equalised linear layer. [B, C, s, s] -> [B, w_dim]."""

    def __init__(self, c_in: int, channels: int, w_dim: int, n: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(n):
            layers += [nn.Conv2d(c_in if i == 0 else channels, channels, 3, 2, 1), nn.LeakyReLU()]
        self.convs = nn.Sequential(*layers)
        self.linear = _EqualLinear(channels, w_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.convs(x)
        if x.shape[2:] != (1, 1):
            raise ValueError(f"the input is larger than this encoder takes (a head ends at "
                             f"{x.shape[2]}x{x.shape[3]}, not 1x1)")
        return self.linear(x.flatten(1))


def _upsample_add(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, size=y.shape[2:], mode="bilinear", align_corners=True) + y


class Encoder(nn.Module):
    """Images [B, 3, S, S] in [-1, 1] (S = ``cfg.input_size``; smaller sides work too) -> W+
    latents [B, num_ws, w_dim] float32: ``latent_avg`` plus the predicted offsets."""

    latent_avg: torch.Tensor  # [num_ws, w_dim]

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        c0 = cfg.stage_channels[0]
        self.input_layer = nn.Sequential(nn.Conv2d(3, c0, 3, 1, 1, bias=False),
                                         nn.BatchNorm2d(c0), nn.PReLU(c0))
        units: list[nn.Module] = []
        c_in = c0
        for n, c_out in zip(cfg.stage_units, cfg.stage_channels, strict=True):
            for i in range(n):
                units.append(_Unit(c_in if i == 0 else c_out, c_out, 2 if i == 0 else 1,
                                   se=cfg.se, reduction=cfg.se_reduction))
            c_in = c_out
        self.body = nn.Sequential(*units)
        ends = [sum(cfg.stage_units[: k + 1]) - 1 for k in range(4)]
        self._taps = (ends[1], ends[2], ends[3])  # c1, c2, c3 (e4e: units 6, 20, 23)
        width = cfg.stage_channels[3]
        convs = cfg.head_convs
        self.styles = nn.ModuleList(
            _StyleHead(width, cfg.head_channels, cfg.w_dim,
                       convs[0] if i < COARSE_END else convs[1] if i < MIDDLE_END else convs[2])
            for i in range(cfg.num_ws))
        self.latlayer1 = nn.Conv2d(cfg.stage_channels[2], width, 1)
        self.latlayer2 = nn.Conv2d(cfg.stage_channels[1], width, 1)
        self.register_buffer("latent_avg", torch.zeros(cfg.num_ws, cfg.w_dim))

    @property
    def num_ws(self) -> int:
        return self.cfg.num_ws

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 3 or x.shape[2] != x.shape[3] or x.shape[2] % 16:
            raise ValueError(f"images must be [B, 3, S, S] with S a multiple of 16, got "
                             f"{list(x.shape)}")
        x = self.input_layer(x)
        feats: list[torch.Tensor] = []
        for i, unit in enumerate(self.body):
            x = unit(x)
            if i in self._taps:
                feats.append(x)
        c1, c2, c3 = feats
        w = self.styles[0](c3)  # [B, w_dim]
        offsets = [torch.zeros_like(w)]
        features = c3
        for i in range(1, self.cfg.num_ws):
            if i == COARSE_END:
                features = p2 = _upsample_add(c3, self.latlayer1(c2))
            elif i == MIDDLE_END:
                features = _upsample_add(p2, self.latlayer2(c1))
            offsets.append(self.styles[i](features))
        ws = w.unsqueeze(1) + torch.stack(offsets, dim=1)  # [B, num_ws, w_dim]
        return ws.float() + self.latent_avg  # float32 under autocast too: latent_avg kept exact
