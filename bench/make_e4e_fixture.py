"""Make the e4e parity fixture with the AUTHORS' code (not run by `make test`; needs their clone).

    git clone https://github.com/omertov/encoder4editing /tmp/e4e   # made at 99ea505
    # In /tmp/e4e only: replace models/stylegan2/op/__init__.py by CPU versions of its two ops
    # (rosinality's "native" upfirdn2d and fused_leaky_relu, plain PyTorch); the original compiles
    # CUDA kernels at import.
    python -m bench.make_e4e_fixture --e4e-code /tmp/e4e --out tests/unit/data

Nothing of their code is copied here or into the fixture: this script imports it from the clone,
builds THEIR ``pSp`` model (``Encoder4Editing`` IR-SE 50 encoder + rosinality decoder) the way
their ``scripts/train.py`` + ``Coach`` do at the start of training (options from THEIR
``TrainOptions`` parser with the README's FFHQ flags, ``setup_progressive_steps``, IR-SE 50 and
StyleGAN weights read by ``pSp.load_weights``), runs it, and saves the checkpoint with THEIR
``Coach.__get_save_dict`` and ``torch.save``, as ``Coach.checkpoint_me`` does.

Smallest faithful configuration: their ``Encoder4Editing`` only supports the 50-layer IR-SE body
(``get_blocks(50)``) and 512-channel heads; ``--stylegan_size 32`` gives 8 W+ layers, the fewest that
use all three pyramid levels (layers 0-2 from c3, 3-6 from p2, 7 from p1). That is still 123 M
numbers (500 MB). So that the stored file stays small, every tensor of the model is a view into a
few seeded random pools (``torch.save`` writes a storage once, however many tensors view it):

* a pool (at most 32768 numbers) per distribution: conv weights N(0, 2/fan_in) (a pool per
  fan-in), BN weights U(0.6, 1.2), BN running variances U(0.5, 1.5), BN biases and running means
  N(0, 0.1), the last BN of each residual branch U(0.1, 0.3) (keeps 24 residual units from
  blowing up), PReLU slopes U(0.05, 0.45), conv / linear biases N(0, 0.1), head linears and the
  decoder N(0, 1);
* each tensor views its pool at a deterministic offset; leading dimensions get smaller strides
  where the tensor is larger than the pool, so neighbouring output channels are shifted windows.

``latent_avg`` is their decoder's mean latent repeated per layer (as their training start makes
it) plus seeded per-layer noise, so that a loader using one row for every layer fails. Their model
is run on these very views (the weights it computes with are the ones saved). The inputs are
seeded uniform noise stored as uint8; the references are ``pSp.forward(x, return_latents=True)``'s
latents (encoder output + ``latent_avg``), float32 on the CPU.
"""

from __future__ import annotations

import argparse
import sys
import types
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from torch import nn

SEED = 20250125
POOL = 1 << 15
SLACK = 1024
STYLEGAN_SIZE = 32
# The README's FFHQ training command (paths and sizes aside).
TRAIN_FLAGS = [
    "--dataset_type", "ffhq_encode", "--exp_dir", "/tmp/e4e-exp", "--start_from_latent_avg",
    "--use_w_pool", "--w_discriminator_lambda", "0.1", "--progressive_start", "20000",
    "--id_lambda", "0.5", "--val_interval", "10000", "--max_steps", "200000",
    "--stylegan_size", str(STYLEGAN_SIZE), "--workers", "8", "--batch_size", "8",
    "--test_batch_size", "4", "--test_workers", "4",
]


def _stub_modules() -> None:
    """Their training module imports plotting and tensorboard at the top; neither runs here."""
    mpl = types.ModuleType("matplotlib")
    mpl.use = lambda *a, **k: None  # type: ignore[attr-defined]
    mpl.pyplot = types.ModuleType("matplotlib.pyplot")  # type: ignore[attr-defined]
    sys.modules.setdefault("matplotlib", mpl)
    sys.modules.setdefault("matplotlib.pyplot", mpl.pyplot)  # type: ignore[attr-defined]
    tb = types.ModuleType("torch.utils.tensorboard")
    tb.SummaryWriter = object  # type: ignore[attr-defined]
    sys.modules.setdefault("torch.utils.tensorboard", tb)


class _Pools:
    """Seeded random pools; ``view(kind, shape)`` gives a tensor viewing the pool of ``kind``.

    A pool holds ``min(POOL, 2 * largest tensor + SLACK)`` numbers (``sizes``: from a first pass
    over the model); a tensor larger than its pool's ``size - SLACK`` gets smaller leading strides.
    """

    def __init__(self, seed: int, sizes: dict[str, int]) -> None:
        self.seed = seed
        self.pools: dict[str, torch.Tensor] = {}
        for kind in sorted(sizes):
            gen = torch.Generator().manual_seed(self.seed + zlib.crc32(kind.encode()))
            dist, _, arg = kind.partition(":")
            size = min(POOL, 2 * sizes[kind] + SLACK)
            if dist == "normal":
                self.pools[kind] = torch.randn(size, generator=gen) * float(arg)
            else:
                lo, hi = (float(v) for v in arg.split(","))
                self.pools[kind] = lo + (hi - lo) * torch.rand(size, generator=gen)
        self.count = 0

    def view(self, kind: str, shape: torch.Size) -> torch.Tensor:
        pool = self.pools[kind]
        dims = list(shape)
        strides = [1] * len(dims)
        for i in range(len(dims) - 2, -1, -1):
            strides[i] = strides[i + 1] * dims[i + 1]

        def span() -> int:
            return sum((d - 1) * s for d, s in zip(dims, strides, strict=True)) + 1

        limit = pool.numel() - SLACK
        for i in range(len(dims)):  # shrink the leading strides until the tensor fits
            if span() <= limit:
                break
            rest = span() - (dims[i] - 1) * strides[i]
            stride = max(1, (limit - rest) // max(dims[i] - 1, 1))
            strides[i] = stride - 1 if stride > 1 and stride % 2 == 0 else stride  # odd
        assert span() <= limit, (kind, shape)
        self.count += 1
        offset = (self.count * 7919) % (pool.numel() - span())
        return pool.as_strided(dims, strides, offset)


def _kind(name: str, module: nn.Module, param: str, last_bn: bool) -> str | None:
    if name.startswith("decoder."):
        return "normal:1"
    if isinstance(module, nn.BatchNorm2d):
        return {"weight": "uniform:0.1,0.3" if last_bn else "uniform:0.6,1.2",
                "running_var": "uniform:0.5,1.5", "bias": "normal:0.1",
                "running_mean": "normal:0.1"}.get(param)  # num_batches_tracked: as it is
    if isinstance(module, nn.PReLU):
        return "uniform:0.05,0.45"
    if isinstance(module, nn.Conv2d):
        if param == "bias":
            return "normal:0.1"
        fan_in = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
        return f"normal:{(2.0 / fan_in) ** 0.5:.6g}"
    if param == "bias":  # EqualLinear of the heads
        return "normal:0.1"
    return "normal:1"


def _tensors(net: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(pool kind, tensor) for every floating parameter and buffer that gets random values."""
    out = []
    for name, module in net.named_modules():
        tensors = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
        for param, tensor in tensors:
            kind = _kind(name, module, param, name.endswith("res_layer.4"))
            if kind is not None and tensor.is_floating_point():
                out.append((kind, tensor))
    return out


def _bind_to_pools(net: nn.Module, seed: int) -> None:
    """Make every parameter and buffer of ``net`` a view into the pools (same values in the
    forward pass and in the saved file)."""
    tensors = _tensors(net)
    sizes: dict[str, int] = {}
    for kind, tensor in tensors:
        sizes[kind] = max(sizes.get(kind, 0), tensor.numel())
    pools = _Pools(seed, sizes)
    for kind, tensor in tensors:
        tensor.data = pools.view(kind, tensor.shape)


def _inputs(size: int, batch: int, seed: int) -> np.ndarray:
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(batch, 3, size, size, generator=gen) * 255).round().to(torch.uint8).numpy()


def to_input(images: np.ndarray) -> torch.Tensor:
    """uint8 [B,3,H,W] -> float32 in [-1, 1]: the conversion the test repeats op for op."""
    return torch.from_numpy(images).float() / 127.5 - 1.0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--e4e-code", required=True, type=Path, help="their repository (a clone)")
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(args.e4e_code.resolve()))
    _stub_modules()
    from configs.paths_config import model_paths  # their code from here on
    from models.psp import pSp
    from models.stylegan2.model import Generator
    from options.train_options import TrainOptions
    from scripts.train import setup_progressive_steps
    from training.coach import Coach

    torch.manual_seed(SEED)
    work = Path("/tmp/e4e-fixture-work")
    work.mkdir(exist_ok=True)
    opts = TrainOptions().parser.parse_args(TRAIN_FLAGS)
    setup_progressive_steps(opts)
    opts.device = "cpu"
    # The start of their training: IR-SE 50 weights into the encoder (strict=False), rosinality
    # StyleGAN weights into the decoder, latent_avg from the StyleGAN file repeated per W+ layer.
    decoder = Generator(STYLEGAN_SIZE, 512, 8, channel_multiplier=2)
    with torch.no_grad():
        mean_latent = decoder.mean_latent(4096)[0]  # [512]
    stylegan_file, irse_file = work / "stylegan.pt", work / "model_ir_se50.pth"
    torch.save({"g_ema": decoder.state_dict(), "latent_avg": mean_latent}, stylegan_file)
    torch.save({}, irse_file)
    model_paths["ir_se50"] = str(irse_file)
    opts.stylegan_weights = str(stylegan_file)
    net = pSp(opts).eval()

    _bind_to_pools(net, SEED)
    gen = torch.Generator().manual_seed(SEED + 1)
    net.latent_avg = net.latent_avg + 0.5 * torch.randn(net.latent_avg.shape, generator=gen)

    refs: dict[str, np.ndarray] = {}
    for tag, size, batch in (("s64", 64, 2), ("s256", 256, 1)):
        images = _inputs(size, batch, SEED + size)
        with torch.no_grad():
            _, latents = net(to_input(images), resize=False, randomize_noise=False,
                             return_latents=True)
            encoded = net.encoder(to_input(images))
        refs[f"images_{tag}"] = images
        refs[f"latents_{tag}"] = latents.numpy()
        print(f"{tag}: latents {tuple(latents.shape)}, |latents| max {latents.abs().max():.3f}, "
              f"encoder part std {encoded.std():.3f}")

    # Coach.checkpoint_me: torch.save(self.__get_save_dict(), ...), as its training loop writes it
    # (Coach sets opts.device = 'cuda:0' before building pSp; the published files carry that).
    opts.device = "cuda:0"
    coach = SimpleNamespace(net=net, opts=opts, global_step=0)
    save_dict = Coach._Coach__get_save_dict(coach)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.save(save_dict, args.out / "e4e_random_stylegan32.pt")
    np.savez_compressed(args.out / "e4e_reference.npz", **refs)
    for name in ("e4e_random_stylegan32.pt", "e4e_reference.npz"):
        print(name, (args.out / name).stat().st_size, "bytes")


if __name__ == "__main__":
    main()
