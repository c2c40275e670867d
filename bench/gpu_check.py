"""Device check: parity with the official renders on CUDA, and first timings at 1024 px.

Usage (on a CUDA machine): python -m bench.gpu_check FIXTURES_DIR
Prints max |ours - official| on the GPU (TF32 off) and generator / inversion-step timings of
the full config-f 1024 architecture with random weights. Timings use CUDA events after warm-up.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from engine.checkpoints import build_generator, load_checkpoint
from engine.invert import invert
from engine.perceptual import LPIPS
from engine.stylegan2 import Generator, GeneratorConfig


def _parity(fixtures: Path, device: torch.device) -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    for layout in ("nvidia", "rosinality"):
        G = build_generator(load_checkpoint(fixtures / f"{layout}_g64_state.safetensors"), device=device)
        ref = np.load(fixtures / f"{layout}_g64_reference.npz")
        with torch.no_grad():
            img = G.synthesis(torch.from_numpy(ref["wplus"]).to(device), noise_mode="const")
        diff = float((img.cpu() - torch.from_numpy(ref["img_const"])).abs().max())
        print(f"parity {layout} on {device}: max abs diff {diff:.2e}")


def _time_ms(fn, iters: int = 10) -> float:  # type: ignore[no-untyped-def]
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def _timings(device: torch.device) -> None:
    cfg = GeneratorConfig.from_channel_base(z_dim=512, w_dim=512, resolution=1024,
                                            channel_base=32768, channel_max=512)
    G = Generator(cfg).to(device).eval().requires_grad_(False)
    for b in (1, 8, 16):
        ws = G.w_avg[None, None].repeat(b, G.num_ws, 1)
        with torch.no_grad():
            ms = _time_ms(lambda ws=ws: G.synthesis(ws))
        print(f"generator forward 1024 px, B={b}: {ms:.2f} ms/batch, {ms / b:.2f} ms/img")
    P = LPIPS().to(device).eval()
    for b in (1, 8):
        targets = torch.rand(b, 3, 1024, 1024, device=device) * 2 - 1
        r = invert(G, targets, perceptual=P, steps=20)
        torch.cuda.synchronize()
        r = invert(G, targets, perceptual=P, steps=50)
        print(f"inversion B={b}: {r.seconds / 50 * 1000:.1f} ms/step, {r.seconds:.2f} s for 50 steps")
    print(f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")


def main() -> None:
    device = torch.device("cuda")
    print(torch.__version__, torch.cuda.get_device_name())
    _parity(Path(sys.argv[1]), device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    _timings(device)


main()
