"""The encoder on a GPU: parity with the authors' latents, forward cost, training rate.

Usage (on a CUDA machine, repository root): python -m bench.encoder_gpu [--out DIR] [--steps N]

1. The e4e parity fixture (tests/unit/data) on the GPU: max |ours - theirs| in strict float32 and
   with the engine's GPU settings (TF32).
2. Encoder forward at B=1 and B=16 for the e4e architecture (IR-SE 50, 256 px, 18 W+ layers),
   float32/TF32 and under bfloat16 autocast: milliseconds per call (torch.utils.benchmark, which
   synchronises the GPU).
3. ``train_encoder`` on a random config-f 1024 generator (channel base 32768) with LPIPS on a VGG16
   trunk (random weights, the real cost): steps per second at the batch size asked, peak memory,
   then a resume from a saved state on the GPU, and ``evaluate_encoder``'s PSNR.

Every network has random weights (no pretrained file can be fetched here). Prints each row and
writes ``encoder_gpu.json`` in --out after each one.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.benchmark import Timer

from bench.make_e4e_fixture import to_input
from engine.encoder import EncoderConfig
from engine.encoder_io import load_encoder
from engine.encoder_train import TrainState, evaluate_encoder, new_encoder, train_encoder
from engine.generators import configure_cuda
from engine.perceptual import LPIPS
from engine.stylegan2 import Generator, GeneratorConfig

DATA = Path(__file__).resolve().parents[1] / "tests" / "unit" / "data"


def _parity(dev: torch.device) -> dict[str, Any]:
    ref = np.load(DATA / "e4e_reference.npz")
    enc = load_encoder(DATA / "e4e_random_stylegan32.pt", device=dev).encoder
    row: dict[str, Any] = {"row": "parity on the GPU"}
    for tf32 in (False, True):
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
        for tag in ("s64", "s256"):
            x = to_input(ref[f"images_{tag}"]).to(dev)
            with torch.no_grad():
                diff = (enc(x).cpu() - torch.from_numpy(ref[f"latents_{tag}"])).abs().max()
            row[f"{tag}_{'tf32' if tf32 else 'fp32'}_max_abs"] = float(diff)
    return row


def _forward(dev: torch.device) -> dict[str, Any]:
    torch.manual_seed(0)
    from engine.encoder import Encoder

    enc = Encoder(EncoderConfig()).to(dev).eval().requires_grad_(False)
    row: dict[str, Any] = {"row": "e4e encoder forward (IR-SE 50, 256 px, 18 ws)",
                           "params_M": round(sum(p.numel() for p in enc.parameters()) / 1e6, 1)}
    for b in (1, 16):
        x = torch.rand(b, 3, 256, 256, device=dev) * 2 - 1
        for bf16 in (False, True):
            def run(x: torch.Tensor = x, bf16: bool = bf16) -> None:
                with torch.no_grad(), torch.autocast("cuda", torch.bfloat16, enabled=bf16):
                    enc(x)
            run()  # warm-up (cuDNN autotuning)
            seconds = Timer("run()", globals={"run": run}).timeit(20).mean
            row[f"B{b}_{'bf16' if bf16 else 'tf32'}_ms"] = round(seconds * 1e3, 2)
    return row


def _generator(dev: torch.device) -> Generator:
    torch.manual_seed(0)
    cfg = GeneratorConfig.from_channel_base(z_dim=512, w_dim=512, resolution=1024,
                                            channel_base=32768, channel_max=512, conv_clamp=256.0)
    G = Generator(cfg).to(dev).eval().requires_grad_(False)
    with torch.no_grad():
        G.mapping.w_avg.copy_(G.mapping(torch.randn(4096, 512, device=dev))[:, 0].mean(0))
    return G


def _training(dev: torch.device, *, steps: int, batch_size: int) -> list[dict[str, Any]]:
    G = _generator(dev)
    with torch.random.fork_rng(devices=[]):
        perceptual = LPIPS().to(dev)  # VGG16 trunk at 256 px, random weights
    encoder = new_encoder(G, EncoderConfig(num_ws=G.num_ws, w_dim=G.w_dim))
    rates: list[float] = []
    saved: list[TrainState] = []
    torch.cuda.reset_peak_memory_stats(dev)
    began = time.perf_counter()
    result = train_encoder(G, encoder, perceptual=perceptual, steps=steps, batch_size=batch_size,
                           save_every=steps // 2, on_save=saved.append,
                           progress=lambda s, t, i: rates.append(i.get("steps_per_s", 0.0)))
    torch.cuda.synchronize()
    wall = time.perf_counter() - began
    rows = [{"row": f"train_encoder, config-f 1024, B={batch_size}, bf16", "steps": steps,
             "steps_per_s": round(rates[-1], 3), "images_per_s": round(rates[-1] * batch_size, 1),
             "wall_s_incl_first_step": round(wall, 1),
             "first_losses": [round(v, 3) for v in result.losses[:3]],
             "last_losses": [round(v, 3) for v in result.losses[-3:]],
             "peak_gib": round(torch.cuda.max_memory_allocated(dev) / 2**30, 1)}]
    again = new_encoder(G, encoder.cfg)
    resumed = train_encoder(G, again, perceptual=perceptual, steps=steps, batch_size=batch_size,
                            resume=saved[0])
    gap = max(float((a - b).abs().max()) for a, b in
              zip(again.state_dict().values(), encoder.state_dict().values(), strict=True)
              if a.is_floating_point())
    quality = evaluate_encoder(G, encoder, perceptual=perceptual)
    rows.append({"row": "resume on the GPU + evaluation", "resumed_from": saved[0].step,
                 "resumed_steps": len(resumed.losses), "max_weight_gap_vs_uninterrupted": gap,
                 "eval": {k: round(v, 4) for k, v in quality.items()}})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/latest"))
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args(argv)
    dev = torch.device("cuda")
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = [{"row": "device", "name": torch.cuda.get_device_name(dev),
                                   "torch": torch.__version__}]

    def emit(row: dict[str, Any]) -> None:
        rows.append(row)
        print(json.dumps(row), flush=True)
        (args.out / "encoder_gpu.json").write_text(json.dumps(rows, indent=2) + "\n")

    emit(rows.pop())
    emit(_parity(dev))
    configure_cuda()
    emit(_forward(dev))
    for row in _training(dev, steps=args.steps, batch_size=args.batch_size):
        emit(row)


if __name__ == "__main__":
    main()
