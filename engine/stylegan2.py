"""StyleGAN2 generator (config-f and smaller variants) in plain PyTorch.

Parameter names follow NVIDIA's stylegan2-ada-pytorch ``training/networks.py`` so that an
official ``G_ema`` state dict loads as it is; the maths is the same (modulated convolution with
demodulation, transposed-convolution upsampling followed by the [1, 3, 3, 1] FIR filter, skip
ToRGB outputs). No runtime-compiled CUDA ops: everything is ordinary PyTorch, on CPU or GPU.

Style space ("S space") is exposed: ``G.synthesis.styles(ws)`` returns the per-layer affine
outputs, and ``G.synthesis.from_styles(styles)`` renders from (possibly edited) styles.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "Generator",
    "GeneratorConfig",
    "NoiseMode",
    "Styles",
    "SynthesisState",
]

NoiseMode = Literal["const", "random", "none"]
# Layer name ("b4.conv1", "b8.torgb", ...) -> style vector [B, C_in].
Styles = dict[str, torch.Tensor]
# Features x [B, C, r, r] and the skip image [B, 3, r, r] between layers (None before the first).
SynthesisState = tuple[torch.Tensor | None, torch.Tensor | None]

_LRELU_GAIN = math.sqrt(2.0)
_FIR = (1.0, 3.0, 3.0, 1.0)
# The 1-D filter at gain 2 per axis (4 in 2-D); symmetric, so convolution and correlation agree.
_FIR_UP = tuple(2.0 * t / sum(_FIR) for t in _FIR)


@dataclass(frozen=True)
class GeneratorConfig:
    """The architecture, independent of where the weights came from."""

    z_dim: int
    w_dim: int
    resolution: int
    # Output channels of each block, by resolution (4, 8, ..., resolution).
    channels: dict[int, int] = field(hash=False)
    mapping_layers: int = 8
    mapping_lr_mul: float = 0.01
    conv_clamp: float | None = None
    img_channels: int = 3

    def __post_init__(self) -> None:
        res = self.resolution
        if res < 4 or res & (res - 1):
            raise ValueError(f"resolution must be a power of two >= 4, got {res}")
        missing = [r for r in self.block_resolutions if r not in self.channels]
        if missing:
            raise ValueError(f"channels missing for resolutions {missing}")

    @property
    def block_resolutions(self) -> list[int]:
        return [2**i for i in range(2, int(math.log2(self.resolution)) + 1)]

    @property
    def num_ws(self) -> int:
        return 2 * int(math.log2(self.resolution)) - 2

    @classmethod
    def from_channel_base(
        cls, *, z_dim: int, w_dim: int, resolution: int, channel_base: int, channel_max: int,
        **kwargs: Any,
    ) -> GeneratorConfig:
        """NVIDIA's rule: channels at resolution r = min(channel_base // r, channel_max)."""
        res_list = [2**i for i in range(2, int(math.log2(resolution)) + 1)]
        channels = {r: min(channel_base // r, channel_max) for r in res_list}
        return cls(z_dim=z_dim, w_dim=w_dim, resolution=resolution, channels=channels, **kwargs)

    def to_json(self) -> str:
        data = {
            "z_dim": self.z_dim,
            "w_dim": self.w_dim,
            "resolution": self.resolution,
            "channels": {str(k): v for k, v in sorted(self.channels.items())},
            "mapping_layers": self.mapping_layers,
            "mapping_lr_mul": self.mapping_lr_mul,
            "conv_clamp": self.conv_clamp,
            "img_channels": self.img_channels,
        }
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> GeneratorConfig:
        data = json.loads(text)
        data["channels"] = {int(k): int(v) for k, v in data["channels"].items()}
        return cls(**data)


def _fir_filter(device: torch.device | None = None) -> torch.Tensor:
    f = torch.tensor(_FIR, device=device)
    f = torch.outer(f, f)
    return f / f.sum()  # [4, 4]


def _blur(x: torch.Tensor, f: torch.Tensor, *, pad: tuple[int, int], gain: float) -> torch.Tensor:
    """Depthwise FIR filter with padding (upfirdn2d with up=down=1). x: [B, C, H, W]."""
    c = x.shape[1]
    x = F.pad(x, [pad[0], pad[1], pad[0], pad[1]])
    w = (f * gain).flip([0, 1]).to(x.dtype)[None, None].expand(c, 1, *f.shape)
    return F.conv2d(x, w, groups=c)


def _upsample2x(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """upfirdn2d.upsample2d with the FIR filter ``f`` (gain 4), [B,C,H,W] -> 2x, for the 3-channel
    skip images. Eager on a GPU, where each kernel launch costs more than its work: zero-insertion
    then the filter as a depthwise conv (two launches); compiled or on the CPU:
    ``_upsample2x_polyphase`` (elementwise, fused when compiled; faster on the CPU, slower per
    eager GPU step: BENCHMARKS.md). ``f`` is a buffer on x's device: no tensor may be created from
    host data here, inside a CUDA graph's capture."""
    if not x.is_cuda or torch.compiler.is_compiling():
        return _upsample2x_polyphase(x)
    return _upsample2x_zero_insert(x, f)


def _upsample2x_zero_insert(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """``_upsample2x`` as upfirdn2d computes it: zeros between the pixels, then the filter."""
    b, c, h, w = x.shape
    x = F.pad(x.reshape(b, c, h, 1, w, 1), [0, 1, 0, 0, 0, 1]).reshape(b, c, h * 2, w * 2)
    return _blur(x, f, pad=(2, 1), gain=4.0)


def _upsample2x_polyphase(x: torch.Tensor) -> torch.Tensor:
    """``_upsample2x_zero_insert`` in polyphase form: per axis, output 2i is taps 0 and 2 of the
    filter on inputs i-1 and i, output 2i+1 taps 1 and 3 on inputs i and i+1 (zeros beyond the
    edges), as zero-insertion then the filter would give."""
    g = _FIR_UP
    for dim in (-1, -2):
        n = x.shape[dim]
        padded = F.pad(x, [1, 1] if dim == -1 else [0, 0, 1, 1])
        before, here, after = (padded.narrow(dim, i, n) for i in range(3))
        x = torch.stack([g[0] * before + g[2] * here, g[1] * here + g[3] * after], dim=dim)
        x = x.flatten(dim - 1, dim)  # [..., n, 2, ...] -> [..., 2n, ...]
    return x


def _conv_up(x: torch.Tensor, weight: torch.Tensor, f: torch.Tensor | None, *, groups: int) -> torch.Tensor:
    """conv2d_resample with up=2: a stride-2 transposed conv (weight: [I, O / groups, k, k]), then
    the FIR filter. [B, I, H, W] -> [B, O, 2H, 2W]."""
    assert f is not None
    x = F.conv_transpose2d(x, weight, stride=2, groups=groups)
    return _blur(x, f, pad=(1, 1), gain=4.0)


def _conv_up_folded(x: torch.Tensor, weight: torch.Tensor, *, groups: int) -> torch.Tensor:
    """``_conv_up`` with the FIR filter folded into the weights: one stride-2 transposed conv with
    the k x k kernel blurred to (k+3) x (k+3), and no pass over the 2x larger output: more
    arithmetic, less memory traffic, which pays for large batches. The kernel is blurred by sums of
    shifted copies, one axis at a time, as a depthwise conv was slow (figures: BENCHMARKS.md)."""
    k = weight.shape[-1]
    for dim in (-1, -2):  # tap j of the filter on the kernel shifted by 3 - j
        padded = F.pad(weight, [3, 3] if dim == -1 else [0, 0, 3, 3])
        taps = [t * padded.narrow(dim, 3 - j, k + 3) for j, t in enumerate(_FIR_UP)]
        weight = sum(taps[1:], taps[0])
    return F.conv_transpose2d(x, weight, stride=2, padding=2, groups=groups)


def _bias_act(
    x: torch.Tensor, b: torch.Tensor, *, lrelu: bool, clamp: float | None
) -> torch.Tensor:
    x = x + b.reshape(1, -1, *([1] * (x.ndim - 2)))
    if lrelu:
        x = F.leaky_relu(x, 0.2) * _LRELU_GAIN
    if clamp is not None:
        x = x.clamp(-clamp, clamp)
    return x


class FullyConnectedLayer(nn.Module):
    def __init__(
        self, in_features: int, out_features: int, *, lrelu: bool = False,
        lr_mul: float = 1.0, bias_init: float = 0.0,
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / lr_mul)
        self.bias = nn.Parameter(torch.full([out_features], float(bias_init)))
        self.weight_gain = lr_mul / math.sqrt(in_features)
        self.bias_gain = lr_mul
        self.lrelu = lrelu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight * self.weight_gain
        b = self.bias * self.bias_gain
        if not self.lrelu:
            return torch.addmm(b.unsqueeze(0), x, w.t())
        return _bias_act(x.matmul(w.t()), b, lrelu=True, clamp=None)


class MappingNetwork(nn.Module):
    w_avg: torch.Tensor

    def __init__(self, cfg: GeneratorConfig) -> None:
        super().__init__()
        self.num_layers = cfg.mapping_layers
        self.num_ws = cfg.num_ws
        dims = [cfg.z_dim] + [cfg.w_dim] * cfg.mapping_layers
        for i in range(cfg.mapping_layers):
            layer = FullyConnectedLayer(dims[i], dims[i + 1], lrelu=True, lr_mul=cfg.mapping_lr_mul)
            setattr(self, f"fc{i}", layer)
        self.register_buffer("w_avg", torch.zeros(cfg.w_dim))

    def forward(self, z: torch.Tensor, *, truncation_psi: float = 1.0) -> torch.Tensor:
        # z: [B, z_dim] -> ws: [B, num_ws, w_dim]
        x = z * (z.square().mean(dim=1, keepdim=True) + 1e-8).rsqrt()
        for i in range(self.num_layers):
            x = getattr(self, f"fc{i}")(x)
        x = x.unsqueeze(1).repeat(1, self.num_ws, 1)
        if truncation_psi != 1.0:
            x = self.w_avg.lerp(x, truncation_psi)
        return x


# Up to these batch sizes: per-sample weights in one grouped conv (no passes over activations).
# With gradients on the styles, the grouped conv's per-sample weight gradients cost more than the
# extra passes except for one eager sample; under torch.compile, never fused (BENCHMARKS.md).
_FUSED_MAX_BATCH = 8
_FUSED_MAX_BATCH_GRAD = 1


def _modulated_conv(
    x: torch.Tensor, weight: torch.Tensor, styles: torch.Tensor, *, demodulate: bool,
    up: bool, f: torch.Tensor | None = None, gain: float = 1.0,
) -> torch.Tensor:
    """Modulated (and demodulated) convolution, output scaled by ``gain``.

    x: [B, I, H, W]; weight: [O, I, k, k]; styles: [B, I] -> [B, O, H', W'] (H' = 2H with ``up``:
    a stride-2 transposed conv, then the FIR filter, as NVIDIA's conv2d_resample does).
    Renders of up to 8 images (and one eager sample whose styles need gradients) modulate the
    weights per sample and run one grouped conv (NVIDIA's "fused" modconv): the activations are
    read and written once. Larger batches, and compiled steps, scale the activations before and
    after one shared-weight conv instead (cheaper than B copies of the weights, no per-sample
    weight gradients), with the FIR filter folded into its weights. Both are the same function.
    """
    b, i, h, w = x.shape
    o, k = weight.shape[0], weight.shape[-1]
    styles = styles.to(torch.float32)
    needs_grad = torch.is_grad_enabled() and styles.requires_grad
    fused_max = _FUSED_MAX_BATCH
    if needs_grad:
        fused_max = 0 if torch.compiler.is_compiling() else _FUSED_MAX_BATCH_GRAD
    if b <= fused_max:
        wt = weight[None] * styles.reshape(b, 1, i, 1, 1)  # [B, O, I, k, k]
        if demodulate:
            wt = wt * (wt.square().sum(dim=[2, 3, 4]) + 1e-8).rsqrt().reshape(b, o, 1, 1, 1)
        wt = (wt * gain).to(x.dtype)
        x = x.reshape(1, b * i, h, w)
        if up:
            x = _conv_up(x, wt.transpose(1, 2).reshape(b * i, o, k, k), f, groups=b)
        else:
            x = F.conv2d(x, wt.reshape(b * o, i, k, k), padding=k // 2, groups=b)
        x = x.reshape(b, o, *x.shape[2:])
    else:
        coefs = torch.full((b, o), gain, device=x.device)
        if demodulate:
            wsq = weight.square().sum(dim=[2, 3])  # [O, I]
            coefs = coefs * (styles.square() @ wsq.t() + 1e-8).rsqrt()  # [B, O]
        x = x * styles.to(x.dtype).reshape(b, i, 1, 1)
        wt = weight.to(x.dtype)
        x = _conv_up_folded(x, wt.transpose(0, 1), groups=1) if up else F.conv2d(x, wt, padding=k // 2)
        x = x * coefs.to(x.dtype).reshape(b, o, 1, 1)
    return x


class SynthesisLayer(nn.Module):
    noise_const: torch.Tensor
    resample_filter: torch.Tensor

    def __init__(
        self, in_channels: int, out_channels: int, *, w_dim: int, resolution: int, up: bool,
        conv_clamp: float | None,
    ) -> None:
        super().__init__()
        self.up = up
        self.resolution = resolution
        self.conv_clamp = conv_clamp
        self.affine = FullyConnectedLayer(w_dim, in_channels, bias_init=1.0)
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, 3, 3))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.noise_strength = nn.Parameter(torch.zeros([]))
        self.register_buffer("noise_const", torch.randn(resolution, resolution))
        self.register_buffer("resample_filter", _fir_filter(), persistent=False)

    def forward(
        self, x: torch.Tensor, styles: torch.Tensor, *, noise_mode: NoiseMode,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # lrelu(v) * g == lrelu(v * g) for g > 0: the gain rides on the conv weights, the bias
        # and the noise, so the activation costs one add and one lrelu pass.
        g = _LRELU_GAIN
        x = _modulated_conv(x, self.weight, styles, demodulate=True, up=self.up, f=self.resample_filter,
                            gain=g)
        if noise is None and noise_mode == "random":
            noise = torch.randn(x.shape[0], 1, self.resolution, self.resolution, device=x.device)
        elif noise is None and noise_mode == "const":
            noise = self.noise_const
        shift = (self.bias * g).to(x.dtype).reshape(1, -1, 1, 1)
        if noise is not None:
            shift = shift + (noise * (self.noise_strength * g)).to(x.dtype)  # [1|B, C|1, H, W]
        x = F.leaky_relu(x + shift, 0.2)
        if self.conv_clamp is not None:
            x = x.clamp(-self.conv_clamp * g, self.conv_clamp * g)
        return x


class ToRGBLayer(nn.Module):
    def __init__(
        self, in_channels: int, out_channels: int, *, w_dim: int, conv_clamp: float | None
    ) -> None:
        super().__init__()
        self.conv_clamp = conv_clamp
        self.affine = FullyConnectedLayer(w_dim, in_channels, bias_init=1.0)
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, 1, 1))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.weight_gain = 1.0 / math.sqrt(in_channels)

    def forward(self, x: torch.Tensor, styles: torch.Tensor) -> torch.Tensor:
        x = _modulated_conv(x, self.weight, styles * self.weight_gain, demodulate=False, up=False)
        return _bias_act(x, self.bias.to(x.dtype), lrelu=False, clamp=self.conv_clamp)


class SynthesisBlock(nn.Module):
    def __init__(self, cfg: GeneratorConfig, resolution: int) -> None:
        super().__init__()
        out_ch = cfg.channels[resolution]
        self.resolution = resolution
        w_dim, clamp = cfg.w_dim, cfg.conv_clamp
        if resolution == 4:
            self.const = nn.Parameter(torch.randn(out_ch, 4, 4))
        else:
            in_ch = cfg.channels[resolution // 2]
            self.conv0 = SynthesisLayer(
                in_ch, out_ch, w_dim=w_dim, resolution=resolution, up=True, conv_clamp=clamp
            )
        self.conv1 = SynthesisLayer(
            out_ch, out_ch, w_dim=w_dim, resolution=resolution, up=False, conv_clamp=clamp
        )
        self.torgb = ToRGBLayer(out_ch, cfg.img_channels, w_dim=w_dim, conv_clamp=clamp)

    @property
    def layer_names(self) -> list[str]:
        names = ["conv1", "torgb"] if self.resolution == 4 else ["conv0", "conv1", "torgb"]
        return [f"b{self.resolution}.{n}" for n in names]


class SynthesisNetwork(nn.Module):
    skip_filter: torch.Tensor

    def __init__(self, cfg: GeneratorConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.block_resolutions = cfg.block_resolutions
        for res in self.block_resolutions:
            setattr(self, f"b{res}", SynthesisBlock(cfg, res))
        self.register_buffer("skip_filter", _fir_filter(), persistent=False)  # [4, 4]
        # Which ws index feeds each layer (NVIDIA's w_idx bookkeeping).
        self.layer_ws: dict[str, int] = {}
        w_idx = 0
        for res in self.block_resolutions:
            block: SynthesisBlock = getattr(self, f"b{res}")
            names = block.layer_names
            for j, name in enumerate(names):
                self.layer_ws[name] = w_idx + j
            w_idx += len(names) - 1

    def layer(self, name: str) -> SynthesisLayer | ToRGBLayer:
        block, sub = name.split(".")
        layer = getattr(getattr(self, block), sub)
        assert isinstance(layer, SynthesisLayer | ToRGBLayer)
        return layer

    def styles(self, ws: torch.Tensor) -> Styles:
        """Style space: the affine output of every layer. ws: [B, num_ws, w_dim]."""
        if ws.ndim != 3 or ws.shape[1] != self.cfg.num_ws or ws.shape[2] != self.cfg.w_dim:
            raise ValueError(
                f"ws must be [B, {self.cfg.num_ws}, {self.cfg.w_dim}], got {list(ws.shape)}"
            )
        return {name: self.layer(name).affine(ws[:, i]) for name, i in self.layer_ws.items()}

    def noise_layers(self) -> dict[str, SynthesisLayer]:
        return {
            name: layer for name in self.layer_ws
            if isinstance(layer := self.layer(name), SynthesisLayer)
        }

    @property
    def layer_names(self) -> list[str]:
        """Every styled layer in execution order: b4.conv1, b4.torgb, b8.conv0, ..."""
        return list(self.layer_ws)

    def run(
        self, styles: Styles, *, begin: int = 0, state: SynthesisState | None = None,
        end: int | None = None, noise_mode: NoiseMode = "const",
        noise: dict[str, torch.Tensor] | None = None,
    ) -> SynthesisState:
        """Run layers ``layer_names[begin:end]`` from ``state`` (features x, skip image img).

        Lets callers cache the computation before a layer and re-run only the rest, e.g. when
        perturbing one layer's styles many times. ``state`` is None when ``begin`` is 0.
        """
        x, img = state if state is not None else (None, None)
        for name in self.layer_names[begin:end]:
            block_name, kind = name.split(".")
            block: SynthesisBlock = getattr(self, block_name)
            if kind == "torgb":
                if img is not None:
                    img = _upsample2x(img, self.skip_filter)
                assert x is not None
                y = block.torgb(x, styles[name])
                img = y if img is None else img + y
                continue
            layer = self.layer(name)
            assert isinstance(layer, SynthesisLayer)
            if x is None:
                x = block.const.unsqueeze(0).repeat(styles[name].shape[0], 1, 1, 1)
                if x.device.type == "cuda" and x.shape[0] == 1:
                    # One image: cuDNN's NHWC kernels, no layout conversions (BENCHMARKS.md: 13%
                    # faster at B=1; slower for the batched paths, which stay NCHW).
                    x = x.contiguous(memory_format=torch.channels_last)
            n = None if noise is None else noise.get(name)
            x = layer(x, styles[name], noise_mode=noise_mode, noise=n)
        return x, img

    def from_styles(
        self, styles: Styles, *, noise_mode: NoiseMode = "const",
        noise: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Render from style vectors. Returns images [B, img_channels, res, res] in ~[-1, 1]."""
        _, img = self.run(styles, noise_mode=noise_mode, noise=noise)
        assert img is not None
        return img

    def forward(
        self, ws: torch.Tensor, *, noise_mode: NoiseMode = "const",
        noise: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        # ws: [B, num_ws, w_dim] -> img: [B, 3, res, res]
        return self.from_styles(self.styles(ws), noise_mode=noise_mode, noise=noise)


class Generator(nn.Module):
    """StyleGAN2 generator: ``mapping`` (z -> ws) and ``synthesis`` (ws -> image)."""

    def __init__(self, cfg: GeneratorConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.mapping = MappingNetwork(cfg)
        self.synthesis = SynthesisNetwork(cfg)

    @property
    def num_ws(self) -> int:
        return self.cfg.num_ws

    @property
    def w_dim(self) -> int:
        return self.cfg.w_dim

    @property
    def resolution(self) -> int:
        return self.cfg.resolution

    @property
    def w_avg(self) -> torch.Tensor:
        return self.mapping.w_avg

    def forward(
        self, z: torch.Tensor, *, truncation_psi: float = 1.0, noise_mode: NoiseMode = "const"
    ) -> torch.Tensor:
        return self.synthesis(self.mapping(z, truncation_psi=truncation_psi), noise_mode=noise_mode)
