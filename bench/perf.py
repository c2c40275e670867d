"""`make bench`: the GPU performance table, every figure from one run on one card.

Usage (on a CUDA machine): python -m bench.perf [--out DIR] [--only NAME,...] [--seeds N]

Builds the full config-f 1024 generator (and 256 / 512 where a figure asks for them) with random
weights, makes in-range targets G(w*) for fixed seeds (w* = mapping(z), psi 1), and measures:
generator forward vs the floor, the baseline method (Image2StyleGAN-style: W+ from zeros, Adam
lr 0.02, 1,500 steps, MSE + VGG16 features at 256 px), our inversion (the product's
``engine.invert.invert`` with its defaults), batched throughput, both edit methods, a 32-frame
512 px morph encoded to MP4, the channel-relevance table build (timed per layer on a slice and
extrapolated) and peak GPU memory for each. Prints each row as it is measured and the table last;
``perf.json`` in --out is rewritten after every row.
Networks with random weights stand in for the pretrained ones (same shapes, same cost).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import clip
import torch
import torch.nn.functional as F
from torch import nn

from bench.common import Row, random_generator, random_losses, random_targets, timed
from engine.clip_model import ClipModel
from engine.directions import style_stats
from engine.edit import DEFAULT_EDIT_STEPS, edit_optimize, render_global_edit
from engine.generators import configure_cuda
from engine.invert import DEFAULT_STEPS, invert, psnr
from engine.morph import morph_latents, render_frames
from engine.stylegan2 import Generator
from engine.video import write_animation


def _event_ms(fn: Callable[[], Any], iters: int = 20, warmup: int = 3) -> float:
    """Median ms of ``fn`` over ``iters`` runs, timed with CUDA events after a warm-up."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def _peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30


def _ceilings(dev: torch.device) -> Row:
    """Measured matmul rates and copy bandwidth: the floors below divide by these."""
    out: Row = {}
    for name, dtype in (("fp32", torch.float32), ("tf32", torch.float32), ("bf16", torch.bfloat16)):
        torch.backends.cuda.matmul.allow_tf32 = name == "tf32"
        a = torch.randn(8192, 8192, device=dev, dtype=dtype)
        ms = _event_ms(lambda a=a: a @ a, iters=10)
        out[f"matmul_{name}_tflops"] = 2 * 8192**3 / ms / 1e9
    x = torch.randn(2**28, device=dev)  # 1 GiB
    ms = _event_ms(lambda: x.clone(), iters=10)
    out["copy_gbps"] = 2 * x.numel() * 4 / ms / 1e6
    configure_cuda()  # back to the product's settings
    return out


def _forward_cost(G: Generator) -> tuple[float, float]:
    """(FLOPs, minimum bytes) of one forward at B=1: conv/matmul FLOPs from PyTorch's counter;
    bytes = weights read once + each layer's output written once and read once (float32)."""
    from torch.utils.flop_counter import FlopCounterMode

    ws = G.w_avg.reshape(1, 1, -1).repeat(1, G.num_ws, 1)
    acts = [0]

    def hook(_m: nn.Module, _i: Any, out: torch.Tensor) -> None:
        acts[0] += out.numel() * 4 * 2

    layers = [m for m in G.synthesis.modules() if type(m).__name__ in ("SynthesisLayer", "ToRGBLayer")]
    handles = [m.register_forward_hook(hook) for m in layers]
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        G.synthesis(ws)
    for h in handles:
        h.remove()
    weights = sum(p.numel() * 4 for p in G.synthesis.parameters())
    return float(counter.get_total_flops()), float(weights + acts[0])


def bench_generator(dev: torch.device, ceil: Row) -> Iterator[Row]:
    for res in (1024, 256):
        G = random_generator(res, dev)
        flops, nbytes = _forward_cost(G)
        floor_ms = max(flops / (ceil["matmul_tf32_tflops"] * 1e12), nbytes / (ceil["copy_gbps"] * 1e9)) * 1e3
        for b in (1, 8, 16):
            ws = G.w_avg.reshape(1, 1, -1).repeat(b, G.num_ws, 1)
            torch.cuda.reset_peak_memory_stats()
            with torch.no_grad():
                ms = _event_ms(lambda ws=ws, G=G: G.synthesis(ws))
            yield {"figure": f"generator forward {res}px B={b}", "ms_per_img": ms / b,
                   "floor_ms_per_img": floor_ms, "gflop_per_img": flops / 1e9,
                   "mbytes_per_img": nbytes / 1e6, "peak_gib": _peak_gib()}
        del G


class _VGGFeatures(nn.Module):
    """VGG16 conv1_1, conv1_2, conv3_2, conv4_2 activations (Image2StyleGAN's perceptual loss)."""

    def __init__(self) -> None:
        super().__init__()
        from torchvision.models import vgg16

        torch.manual_seed(1)
        self.features = vgg16(weights=None).features[:22].eval().requires_grad_(False)
        self.taps = (1, 3, 13, 20)
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = ((x + 1) / 2 - self.mean) / self.std
        out = []
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in self.taps:
                out.append(h)
        return out


def baseline_invert(G: Generator, target: torch.Tensor, vgg: _VGGFeatures, *, steps: int = 1500,
                    lr: float = 0.02, every: int = 50) -> list[tuple[int, float, float]]:
    """The yardstick: W+ from zeros, Adam lr 0.02, MSE + VGG16 features at 256 px, eager fp32.

    Returns its curve: (step, seconds of optimisation so far, full-size PSNR) every ``every`` steps
    (the PSNR renders are not counted in the seconds)."""
    ws = torch.zeros(target.shape[0], G.num_ws, G.w_dim, device=target.device, requires_grad=True)
    opt = torch.optim.Adam([ws], lr=lr)
    t_small = F.interpolate(target, size=(256, 256), mode="area")
    with torch.no_grad():
        t_feats = vgg(t_small)
    curve, elapsed = [], 0.0
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        small = F.interpolate(G.synthesis(ws), size=(256, 256), mode="area")
        loss = F.mse_loss(small, t_small)
        for f, tf in zip(vgg(small), t_feats, strict=True):
            loss = loss + F.mse_loss(f, tf)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % every == 0 or step == steps:
            torch.cuda.synchronize()
            elapsed += time.perf_counter() - t0
            with torch.no_grad():
                curve.append((step, elapsed, float(psnr(G.synthesis(ws), target).mean())))
            torch.cuda.synchronize()
            t0 = time.perf_counter()
    return curve


def bench_inversion(dev: torch.device, seeds: int, baseline_seeds: int) -> Iterator[Row]:
    G = random_generator(1024, dev)
    lpips, identity = random_losses(dev)
    _, targets = random_targets(G, list(range(seeds)))

    vgg = _VGGFeatures().to(dev)
    torch.cuda.reset_peak_memory_stats()
    curves = [baseline_invert(G, targets[i:i + 1], vgg) for i in range(baseline_seeds)]
    base = {"figure": "baseline inversion (1500 steps) B=1",
            "s_per_selfie": statistics.median(c[-1][1] for c in curves),
            "psnr": statistics.mean(c[-1][2] for c in curves), "peak_gib": _peak_gib(),
            "curve_each": curves}
    yield base

    def ours(batch: torch.Tensor, **kw: Any) -> Any:
        return invert(G, batch, perceptual=lpips, identity=identity, **kw)

    # The first call of each batch size: compiling the step, cuDNN autotuning, allocator growth.
    first_s, _ = timed(lambda: ours(targets[:1], steps=8))
    torch.cuda.reset_peak_memory_stats()
    times, ps = [], []
    for i in range(seeds):
        t, res = timed(lambda i=i: ours(targets[i:i + 1]))
        times.append(t)
        ps.append(res.psnr[0])
    p50 = statistics.median(times)
    same = statistics.mean(ps[:baseline_seeds])
    yield {"figure": f"our inversion ({DEFAULT_STEPS} steps) B=1", "s_per_selfie": p50,
           "s_each": times, "psnr": statistics.mean(ps), "psnr_each": ps,
           "psnr_on_baseline_seeds": same, "first_run_s": first_s, "peak_gib": _peak_gib()}
    yield {"figure": "speed-up vs baseline (1500 steps)", "x": base["s_per_selfie"] / p50,
           "psnr_delta_db": same - base["psnr"]}
    # The baseline's own time to reach our PSNR (its curve, same seeds): speed-up at equal PSNR.
    reach = [next((s for _, s, q in c if q >= ps[i]), float("nan")) for i, c in enumerate(curves)]
    yield {"figure": "speed-up vs baseline at equal PSNR",
           "baseline_s_to_our_psnr": statistics.mean(reach), "x": statistics.mean(reach) / p50}
    for b in (4, 8, 16):  # 16: beyond the queue's default batch_size of 8, what [engine] batch_size = 16 buys
        batch = targets[:b] if b <= seeds else targets.repeat((b + seeds - 1) // seeds, 1, 1, 1)[:b]
        first_s, _ = timed(lambda batch=batch: ours(batch, steps=8))
        torch.cuda.reset_peak_memory_stats()
        t, res = timed(lambda batch=batch: ours(batch))
        yield {"figure": f"throughput, batched B={b}", "selfies_per_min": 60 * b / t,
               "psnr": statistics.mean(res.psnr), "first_run_s": first_s, "peak_gib": _peak_gib()}


def _clip_b32(dev: torch.device) -> ClipModel:
    torch.manual_seed(3)
    model = clip.model.CLIP(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768,
                            vision_patch_size=32, context_length=77, vocab_size=49408,
                            transformer_width=512, transformer_heads=8, transformer_layers=12)
    return ClipModel(model=model, name="ViT-B/32 (random)", is_demo=True, model_key="bench", device=dev)


def bench_edits(dev: torch.device) -> Iterator[Row]:
    G = random_generator(1024, dev)
    cm = _clip_b32(dev)
    _, identity = random_losses(dev)
    ws, _ = random_targets(G, [100])
    # Global directions: text -> CLIP direction -> per-channel relevance -> style delta -> render.
    n_ch = sum(s.shape[1] for s in G.synthesis.styles(ws).values())
    table = F.normalize(torch.randn(n_ch, 512, device=dev), dim=-1)  # stands in for the built table
    _, std = style_stats(G, samples=1024)
    names = list(std)

    def global_edit() -> torch.Tensor:
        d = cm.text_direction("a smiling face", "a face")  # [512]
        rel = table @ d.to(dev)
        rel = torch.where(rel.abs() >= 0.1, rel, torch.zeros_like(rel))
        parts = torch.split(rel, [std[n].numel() for n in names])
        delta = {n: p * std[n] for n, p in zip(names, parts, strict=True)}
        return render_global_edit(G, ws, delta, strength=4.0)

    torch.cuda.reset_peak_memory_stats()
    yield {"figure": "edit, global directions", "ms": _event_ms(global_edit, iters=10),
           "peak_gib": _peak_gib()}
    text = cm.text_embedding("a smiling face")[None].to(dev)
    edit_optimize(G, ws, text, encode=cm.encode_images, steps=8, identity=identity)  # warm-up
    torch.cuda.reset_peak_memory_stats()
    t, _ = timed(lambda: edit_optimize(G, ws, text, encode=cm.encode_images, identity=identity))
    yield {"figure": f"edit, latent optimisation ({DEFAULT_EDIT_STEPS} steps)", "s": t,
           "peak_gib": _peak_gib()}
    yield _table_estimate(G, cm)


def _table_estimate(G: Generator, cm: ClipModel, samples: int = 32, batch_size: int = 64) -> Row:
    """The channel table build (engine.directions) for this generator, timed one chunk per layer:
    each chunk renders 2 x samples images from the layer on and CLIP-encodes them."""
    syn = G.synthesis
    z = torch.randn(samples, G.cfg.z_dim, generator=torch.Generator().manual_seed(0)).to(G.w_avg.device)
    with torch.no_grad():
        styles = syn.styles(G.mapping(z, truncation_psi=0.7))
    total_s = 0.0
    per_chunk = max(1, batch_size // (2 * samples))
    for layer in [n for n in syn.layer_names if not n.endswith("torgb")]:
        begin = syn.layer_names.index(layer)
        with torch.no_grad():
            x, img = syn.run(styles, end=begin)
            reps = 2 * per_chunk
            prefix = (None if x is None else x.repeat(reps, 1, 1, 1),
                      None if img is None else img.repeat(reps, 1, 1, 1))
            batch = {name: s.repeat(reps, 1) for name, s in styles.items()}

            def chunk(batch: Any = batch, begin: int = begin, prefix: Any = prefix) -> torch.Tensor:
                _, images = syn.run(batch, begin=begin, state=prefix)
                return cm.encode_images(images)

            ms = _event_ms(chunk, iters=3, warmup=1)
        total_s += ms / 1e3 * styles[layer].shape[1] / per_chunk
    return {"figure": f"channel table build, 1024px, {samples} samples (extrapolated)",
            "minutes": total_s / 60, "peak_gib": _peak_gib()}


def bench_morph(dev: torch.device) -> Iterator[Row]:
    G = random_generator(512, dev)
    ws, _ = random_targets(G, [7, 8])

    def morph() -> None:
        frames = render_frames(G, morph_latents(ws[0], ws[1], frames=32), batch_size=16)
        with tempfile.TemporaryDirectory() as tmp:
            write_animation(frames, Path(tmp) / "m.mp4", fps=24)

    morph()
    torch.cuda.reset_peak_memory_stats()
    runs = [timed(morph)[0] for _ in range(3)]
    yield {"figure": "morph, 32 frames at 512 px, MP4", "s": statistics.median(runs),
           "peak_gib": _peak_gib()}


_SECTIONS = ("generator", "inversion", "edits", "morph")  # the table
_EXPERIMENTS = ("variants", "profile")  # the sweep and the kernel profile (bench/experiments.py)


def _fmt(row: Row) -> str:
    keys = [k for k in row if k != "figure" and not k.endswith("_each")]
    return f"| {row['figure']} | " + ", ".join(
        f"{k} {row[k]:.4g}" if isinstance(row[k], float) else f"{k} {row[k]}" for k in keys) + " |"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--only", default=",".join(_SECTIONS), help="sections, run in this order: "
                    + ", ".join(_SECTIONS + _EXPERIMENTS))
    ap.add_argument("--seeds", type=int, default=5, help="selfies for our p50")
    ap.add_argument("--baseline-seeds", type=int, default=2)
    ap.add_argument("--variants", default="", help="with --only variants: those whose label contains "
                    "one of these ';'-separated strings (default: all)")
    args = ap.parse_args(argv)
    only = [name.strip() for name in args.only.split(",")]
    unknown = [name for name in only if name not in _SECTIONS + _EXPERIMENTS]
    if unknown:
        ap.error(f"unknown sections: {', '.join(unknown)}")
    if not torch.cuda.is_available():
        print("bench.perf needs a CUDA GPU")
        return 2
    from bench import experiments  # the sweep and the profile

    dev = torch.device("cuda")
    configure_cuda()
    card = torch.cuda.get_device_name(dev)
    report: Row = {"card": card, "torch": torch.__version__, "ceilings": _ceilings(dev), "rows": []}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    sections: dict[str, Callable[[], Iterator[Row]]] = {
        "generator": lambda: bench_generator(dev, report["ceilings"]),
        "inversion": lambda: bench_inversion(dev, args.seeds, args.baseline_seeds),
        "edits": lambda: bench_edits(dev), "morph": lambda: bench_morph(dev),
        "variants": lambda: experiments.bench_variants(dev, args.seeds, args.variants),
        "profile": lambda: experiments.bench_profile(dev)}
    for name in only:
        t0 = time.perf_counter()
        for row in sections[name]():  # each row printed and saved as it comes: a cut-short run keeps them
            report["rows"].append(row)
            print(_fmt(row), flush=True)
            (Path(args.out) / "perf.json").write_text(json.dumps(report, indent=1))
        print(f"[{name}: {time.perf_counter() - t0:.0f} s]", flush=True)
        torch.cuda.empty_cache()
    print(f"card: {card}, torch {torch.__version__}")
    print("ceilings: " + ", ".join(f"{k} {v:.4g}" for k, v in report["ceilings"].items()))
    for row in report["rows"]:
        print(_fmt(row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
