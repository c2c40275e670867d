"""The encoder on a GPU: parity, forward cost, training, and inversion from its start (issue 25).

Usage (on a CUDA machine, repository root): python -m bench.encoder_gpu [--out DIR] [--train-s S]
  [--state FILE] [--train-only]

1. The e4e parity fixture (tests/unit/data) on the GPU: max |ours - theirs| in strict float32 and
   with the engine's GPU settings (TF32).
2. Encoder forward at B=1 and B=16 for the e4e architecture (IR-SE 50, 256 px, 18 W+ layers),
   float32/TF32 and under bfloat16 autocast: milliseconds per call (torch.utils.benchmark).
3. ``train_encoder`` for ``--train-s`` seconds on the bench's random config-f 1024 generator
   (bench.common, as bench.perf's inversion rows) with LPIPS on a VGG16 trunk (random weights, the
   real cost): steps per second, peak memory, ``evaluate_encoder``'s PSNR.
4. On bench.perf's in-range targets (seeds 0..): the encoder alone (PSNR, first-look latency:
   encoder + render at B=1); our inversion from ``w_avg`` (300 steps, lr 0.2: the product without an
   encoder); from the encoder's start at several rates (PSNR every 10 steps: the steps and seconds
   to reach the w_avg run's PSNR and the baseline's); then the new default (encoder + its steps at
   ENCODER_LR) at B=1 (p50) and batched (B=16, selfies per minute). All uncompiled (CUDA graphs on,
   as the engine before a size is compiled): compiling each size costs minutes of GPU time.
5. Optionally (--baseline-seeds) the Image2StyleGAN-style baseline of bench.perf on the same targets.

Every network has random weights (no pretrained file can be fetched here). Prints each row and
writes ``encoder_gpu.json`` in --out after each one.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.benchmark import Timer

from bench.common import random_generator, random_losses, random_targets, timed
from bench.make_e4e_fixture import to_input
from bench.perf import _VGGFeatures, baseline_invert
from engine.encoder import Encoder, EncoderConfig
from engine.encoder_io import load_encoder
from engine.encoder_train import TrainState, evaluate_encoder, new_encoder, train_encoder
from engine.generators import configure_cuda
from engine.invert import DEFAULT_STEPS, ENCODER_LR, ENCODER_STEPS, invert, psnr
from engine.operations import encode
from engine.perceptual import LPIPS
from engine.stylegan2 import Generator

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


def _train(G: Generator, perceptual: LPIPS, *, seconds: float, batch_size: int,
           state: Path | None) -> tuple[Encoder, dict]:
    """Train for about ``seconds``: runs of 50 steps, each resumed from the last one's state.

    ``state``: resume from this file if it exists, and write the state there every minute and at
    the end (so that chained calls on one machine train one encoder)."""
    encoder = new_encoder(G, EncoderConfig(num_ws=G.num_ws, w_dim=G.w_dim))
    saved: list[TrainState] = []
    if state is not None and state.exists():
        saved.append(TrainState(**torch.load(state, weights_only=True)))
    resumed_from = saved[0].step if saved else 0
    losses: list[float] = []
    torch.cuda.reset_peak_memory_stats()
    began = last_write = time.perf_counter()
    trained_s, timed_steps = 0.0, 0
    while time.perf_counter() - began < seconds:
        run = train_encoder(G, encoder, perceptual=perceptual, steps=(saved[-1].step if saved else 0) + 50,
                            batch_size=batch_size, resume=saved[-1] if saved else None,
                            on_save=saved.append)
        losses += run.losses
        if len(losses) > 50:  # the first run of a process tunes cuDNN
            trained_s += run.seconds
            timed_steps += run.steps - run.start_step
        if state is not None and (time.perf_counter() - last_write > 60
                                  or time.perf_counter() - began >= seconds):
            torch.save(vars(saved[-1]), state)
            last_write = time.perf_counter()
    wall = time.perf_counter() - began
    steps = saved[-1].step
    quality = evaluate_encoder(G, encoder, perceptual=perceptual)
    rate = timed_steps / trained_s if trained_s else float("nan")
    return encoder, {
        "row": f"train_encoder, config-f 1024, B={batch_size}, lr 1e-4 (the CLI's default)",
        "steps": steps, "resumed_from": resumed_from, "wall_s": round(wall, 1),
        "steps_per_s": round(rate, 3),
        "images_per_s": round(batch_size * rate, 1),
        "first_losses": [round(v, 3) for v in losses[:3]],
        "last_losses": [round(v, 3) for v in losses[-3:]],
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1),
        "eval_on_training_like_samples": {k: round(v, 4) for k, v in quality.items()}}


def _reach(curve: list[tuple[int, float, float]], target: float) -> tuple[int, float] | None:
    """The first (step, seconds) of a curve of (step, seconds, PSNR) at or above ``target``."""
    return next(((step, s) for step, s, q in curve if q >= target), None)


def _curve(G: Generator, target: torch.Tensor, losses: tuple[LPIPS, Any], *, steps: int, lr: float,
           start: torch.Tensor | None) -> tuple[list[tuple[int, float, float]], Any]:
    """An inversion's PSNR every 10 steps with the seconds so far (its own clock; the schedule is
    the ``steps``-long one, so an early point is a lower bound on a shorter run's end)."""
    lpips, identity = losses
    curve: list[tuple[int, float, float]] = []
    began = time.perf_counter()
    res = invert(G, target, perceptual=lpips, identity=identity, steps=steps, lr=lr, start=start,
                 compile=False, progress=lambda s, t, i: curve.append(
                     (s, time.perf_counter() - began, i["psnr"])))
    return curve, res


def _inversions(G: Generator, encoder: Encoder, *, seeds: int, lrs: list[float],
                baseline_seeds: int) -> Any:
    losses = random_losses(G.w_avg.device)
    lpips, identity = losses
    _, targets = random_targets(G, list(range(seeds)))
    timed(lambda: G.synthesis(encode(encoder, targets[:1])))  # cuDNN tuning
    looks = []
    for _ in range(5):
        t, _ = timed(lambda: G.synthesis(encode(encoder, targets[:1])))
        looks.append(t)
    starts = encode(encoder, targets)
    with torch.no_grad():
        alone = psnr(G.synthesis(starts).clamp(-1, 1), targets)
    yield {"row": "encoder alone on in-range targets", "psnr_each": [round(float(x), 2) for x in alone],
           "psnr": round(float(alone.mean()), 2),
           "first_look_ms_b1_p50": round(1e3 * statistics.median(looks), 1)}
    invert(G, targets[:1], perceptual=lpips, identity=identity, steps=12, compile=False)  # tuning
    ours = [_curve(G, targets[i:i + 1], losses, steps=DEFAULT_STEPS, lr=0.2, start=None)
            for i in range(seeds)]
    ours_psnr = [res.psnr[0] for _, res in ours]
    yield {"row": f"ours from w_avg, {DEFAULT_STEPS} steps, lr 0.2, B=1 (uncompiled)",
           "psnr_each": [round(x, 2) for x in ours_psnr], "psnr": round(statistics.mean(ours_psnr), 2),
           "s_p50": round(statistics.median(res.seconds for _, res in ours), 3)}
    base: list[float] = []
    if baseline_seeds:
        vgg = _VGGFeatures().to(G.w_avg.device)
        for i in range(baseline_seeds):
            curve = baseline_invert(G, targets[i:i + 1], vgg)
            base.append(curve[-1][2])
            yield {"row": f"baseline (1500 steps) seed {i}", "psnr": round(curve[-1][2], 2),
                   "s": round(curve[-1][1], 1),
                   "s_to_ours_w_avg_psnr": (_reach(curve, ours_psnr[i]) or (None, None))[1]}
    for lr in lrs:
        rows = []
        for i in range(seeds):
            curve, res = _curve(G, targets[i:i + 1], losses, steps=DEFAULT_STEPS, lr=lr,
                                start=starts[i:i + 1])
            rows.append({"end_psnr": round(res.psnr[0], 2),
                         "to_w_avg_psnr": _reach(curve, ours_psnr[i]),
                         "to_baseline_psnr": _reach(curve, base[i]) if i < len(base) else None,
                         "psnr_at": {s: round(q, 2) for s, _, q in curve if s in (10, 50, 100, 200)}})
        yield {"row": f"from the encoder, {DEFAULT_STEPS}-step schedule, lr {lr}", "each": rows}
    times, qs = [], []
    for i in range(seeds):
        def new_default(i: int = i) -> Any:
            start = encode(encoder, targets[i:i + 1])
            return invert(G, targets[i:i + 1], perceptual=lpips, identity=identity, start=start,
                          lr=ENCODER_LR, steps=ENCODER_STEPS, compile=False)
        t, res = timed(new_default)
        times.append(t)
        qs.append(res.psnr[0])
    p50 = statistics.median(times)
    ours_s = statistics.median(res.seconds for _, res in ours)
    yield {"row": f"new default: encoder + {ENCODER_STEPS} steps at lr {ENCODER_LR}, B=1 (uncompiled)",
           "s_each": [round(t, 3) for t in times], "s_p50": round(p50, 3),
           "psnr_each": [round(q, 2) for q in qs], "psnr": round(statistics.mean(qs), 2),
           "speedup_vs_w_avg_300": round(ours_s / p50, 2),
           "psnr_delta_vs_w_avg_300": round(statistics.mean(qs) - statistics.mean(ours_psnr), 2)}
    batch = targets.repeat((16 + seeds - 1) // seeds, 1, 1, 1)[:16]
    def batched() -> Any:
        return invert(G, batch, perceptual=lpips, identity=identity, start=encode(encoder, batch),
                      lr=ENCODER_LR, steps=ENCODER_STEPS, compile=False)
    timed(lambda: invert(G, batch, perceptual=lpips, identity=identity, steps=12, compile=False))
    t, res = timed(batched)
    yield {"row": "new default batched, B=16 (uncompiled)", "s": round(t, 2),
           "selfies_per_min": round(60 * 16 / t, 1), "psnr": round(statistics.mean(res.psnr), 2)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/latest"))
    parser.add_argument("--train-s", type=float, default=180)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--lrs", default="0.005,0.01,0.02,0.05")
    parser.add_argument("--baseline-seeds", type=int, default=0)
    parser.add_argument("--skip", default="", help="comma-separated: parity, forward")
    parser.add_argument("--state", type=Path, help="training state: resumed from, written to")
    parser.add_argument("--train-only", action="store_true", help="stop after training")
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
    if "parity" not in args.skip:
        emit(_parity(dev))
    configure_cuda()
    if "forward" not in args.skip:
        emit(_forward(dev))
    G = random_generator(1024, dev)  # bench.perf's: its inversion rows are comparable
    with torch.random.fork_rng(devices=[]):
        perceptual = LPIPS().to(dev)
    encoder, row = _train(G, perceptual, seconds=args.train_s, batch_size=args.batch_size,
                          state=args.state)
    emit(row)
    if args.train_only:
        return
    for row in _inversions(G, encoder, seeds=args.seeds, lrs=[float(x) for x in args.lrs.split(",")],
                           baseline_seeds=args.baseline_seeds):
        emit(row)


if __name__ == "__main__":
    main()
