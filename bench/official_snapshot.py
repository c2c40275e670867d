"""Write a random-weight StyleGAN2 training snapshot with NVIDIA's own code, the way its training
loop does (stylegan2-ada-pytorch ``training/training_loop.py``): ``pickle.dump(dict(G=..., D=...,
G_ema=..., augment_pipe=None, training_set_kwargs=...))``, networks built with its config for
1024 px FFHQ (``--cfg=stylegan2``: 8 mapping layers, channel_base 32768, 4 float16 resolutions,
conv_clamp 256). The GPU smoke loads this file, as a real deployment loads ``ffhq.pkl``.

NVIDIA's code is not part of this repository: clone it and name its folder,
``git clone https://github.com/NVlabs/stylegan2-ada-pytorch`` (only ``dnnlib``, ``torch_utils``
and ``training`` are used; building and pickling the networks compiles nothing).

Usage: python -m bench.official_snapshot CODE_DIR OUT.pkl [--resolution 1024]
"""

from __future__ import annotations

import argparse
import copy
import pickle
import sys
from pathlib import Path
from typing import Any

import torch


def write_snapshot(code_dir: Path, out: Path, *, resolution: int = 1024, seed: int = 0) -> None:
    sys.path.insert(0, str(code_dir))
    import dnnlib
    from training import networks

    torch.manual_seed(seed)
    common: dict[str, Any] = dict(c_dim=0, img_resolution=resolution, img_channels=3)
    synthesis = dict(channel_base=32768, channel_max=512, num_fp16_res=4, conv_clamp=256)
    G = networks.Generator(z_dim=512, w_dim=512, mapping_kwargs=dict(num_layers=8),
                           synthesis_kwargs=synthesis, **common)
    D = networks.Discriminator(block_kwargs={}, mapping_kwargs={}, epilogue_kwargs=dict(mbstd_group_size=4),
                               **synthesis, **common)
    with torch.no_grad():  # a trained generator's w_avg is the mean of its mapping's outputs
        G.mapping.w_avg.copy_(G.mapping(torch.randn(2000, 512), None)[:, 0].mean(0))
    G_ema = copy.deepcopy(G).eval()
    snapshot = dict(training_set_kwargs=dnnlib.EasyDict(class_name="training.dataset.ImageFolderDataset",
                                                        path="ffhq.zip", resolution=resolution))
    for name, module in [("G", G), ("D", D), ("G_ema", G_ema), ("augment_pipe", None)]:
        if module is not None:  # as training_loop.py: a CPU copy, eval mode, no gradients
            module = copy.deepcopy(module).eval().requires_grad_(False).cpu()
        snapshot[name] = module
    with out.open("wb") as f:
        pickle.dump(snapshot, f)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("code_dir", type=Path, help="a clone of NVlabs/stylegan2-ada-pytorch")
    p.add_argument("out", type=Path)
    p.add_argument("--resolution", type=int, default=1024)
    args = p.parse_args(argv)
    write_snapshot(args.code_dir, args.out, resolution=args.resolution)
    print(f"wrote {args.out} ({args.out.stat().st_size / 2**20:.0f} MiB)")


if __name__ == "__main__":
    main()
