"""Experiments behind BENCHMARKS.md's "What was tried": inversion variants measured side by side
(``python -m bench.perf --only variants --variants ...``) and a kernel profile of one inversion step
(``--only profile``), on the networks and targets of ``bench.perf``."""

from __future__ import annotations

import contextlib
import functools
import re
import statistics
from collections.abc import Iterator
from typing import Any
from unittest import mock

import torch
import torch.nn.functional as F

from bench.common import Row, random_generator, random_losses, random_targets, timed
from engine import stylegan2
from engine.identity import IdentityLoss
from engine.invert import invert
from engine.perceptual import LPIPS
from engine.stylegan2 import Generator

__all__ = ["VARIANTS", "bench_profile", "bench_variants", "kernel_shares"]


def _blur_pooled(x: torch.Tensor, f: torch.Tensor, *, pad: tuple[int, int], gain: float) -> torch.Tensor:
    """``engine.stylegan2._blur`` for its [1, 3, 3, 1] filter as three 2x2 average pools (the
    binomial filter is three 2-tap boxes per axis): pooling kernels instead of a depthwise conv."""
    assert list(stylegan2._FIR) == [1, 3, 3, 1], "only [1, 3, 3, 1] factors this way"
    x = F.pad(x, [pad[0], pad[1], pad[0], pad[1]])
    for _ in range(3):
        x = F.avg_pool2d(x, kernel_size=2, stride=1)
    return x * gain


@functools.cache
def _fir_filter(device: torch.device) -> torch.Tensor:
    """One filter per device, made before any CUDA graph capture (which forbids host copies)."""
    return stylegan2._fir_filter(device)


def _conv_up_then_blur(x: torch.Tensor, weight: torch.Tensor, *, groups: int) -> torch.Tensor:
    """``engine.stylegan2._conv_up_folded``'s signature, unfolded: transposed conv, then the blur."""
    return stylegan2._conv_up(x, weight, _fir_filter(x.device), groups=groups)


def _conv_up_folded_depthwise(x: torch.Tensor, weight: torch.Tensor, *, groups: int) -> torch.Tensor:
    """``engine.stylegan2._conv_up_folded`` as it was until 2026-11-29: the kernel blurred by a
    depthwise conv over its O x I channels."""
    n, o, k, _ = weight.shape
    f = _fir_filter(x.device)
    folded = stylegan2._blur(weight.reshape(1, n * o, k, k), f, pad=(3, 3), gain=4.0)
    return F.conv_transpose2d(x, folded.reshape(n, o, k + 3, k + 3), stride=2, padding=2, groups=groups)


def _conv_up_fused_folded(x: torch.Tensor, weight: torch.Tensor, f: torch.Tensor | None, *,
                          groups: int) -> torch.Tensor:
    """``engine.stylegan2._conv_up``'s signature, folded (for the fused path)."""
    return stylegan2._conv_up_folded(x, weight, groups=groups)


_NEVER_FUSED = {"_FUSED_MAX_BATCH": 0, "_FUSED_MAX_BATCH_GRAD": 0}

# (label, invert keyword arguments, batch size, engine.stylegan2 names replaced while it runs):
# what each optimisation buys, measured side by side. `--variants` picks some.
VARIANTS: list[tuple[str, dict[str, Any], int, dict[str, Any]]] = [
    ("300 steps, eager, fp32/TF32", {"steps": 300, "graph": False, "bf16": False}, 1, {}),
    ("300 steps, CUDA graph, fp32/TF32", {"steps": 300, "bf16": False}, 1, {}),
    ("300 steps, graph, bf16 autocast", {"steps": 300}, 1, {}),
    ("600 steps, graph, bf16", {"steps": 600}, 1, {}),
    ("150 steps, graph, bf16, lr 0.1", {"steps": 150, "lr": 0.1}, 1, {}),
    ("300 steps, graph, bf16, no identity loss", {"steps": 300, "identity": None}, 1, {}),
    ("300 steps, lr 0.05 (the default before 2026-11-29)", {"steps": 300, "lr": 0.05}, 1, {}),
    ("300 steps, modconv never fused", {"steps": 300}, 1, _NEVER_FUSED),
    ("300 steps, B=8 (modconv not fused when optimising)", {"steps": 300}, 8, {}),
    ("300 steps, B=8, unfused, FIR blur after the transposed conv", {"steps": 300}, 8,
     {"_conv_up_folded": _conv_up_then_blur}),
    ("300 steps, B=8, modconv fused", {"steps": 300}, 8, {"_FUSED_MAX_BATCH_GRAD": 8}),
    ("300 steps, B=4, modconv fused", {"steps": 300}, 4, {"_FUSED_MAX_BATCH_GRAD": 4}),
    ("300 steps, B=4 (modconv not fused when optimising)", {"steps": 300}, 4, {}),
    ("300 steps, torch.compile (product on CUDA)", {"steps": 300, "compile": True}, 1, {}),
    ("400 steps, torch.compile", {"steps": 400, "compile": True}, 1, {}),
    ("600 steps, torch.compile", {"steps": 600, "compile": True}, 1, {}),
    ("300 steps, B=8, torch.compile", {"steps": 300, "compile": True}, 8, {}),
    ("300 steps, B=16, torch.compile", {"steps": 300, "compile": True}, 16, {}),
    ("300 steps, FIR blur as average pools", {"steps": 300}, 1, {"_blur": _blur_pooled}),
    ("300 steps, B=8, FIR blur as average pools", {"steps": 300}, 8, {"_blur": _blur_pooled}),
    ("300 steps, FIR blur folded into the transposed conv", {"steps": 300}, 1,
     {"_conv_up": _conv_up_fused_folded}),
    ("300 steps, B=2, modconv fused", {"steps": 300}, 2, {"_FUSED_MAX_BATCH_GRAD": 2}),
    ("300 steps, B=2, modconv never fused", {"steps": 300}, 2, _NEVER_FUSED),
    ("300 steps, B=4, torch.compile", {"steps": 300, "compile": True}, 4, {}),
    ("300 steps, lr 0.3", {"steps": 300, "lr": 0.3}, 1, {}),
    ("300 steps, torch.compile, kernel blurred by a depthwise conv (before 2026-11-29)",
     {"steps": 300, "compile": True}, 1, {"_conv_up_folded": _conv_up_folded_depthwise}),
    ("300 steps, B=8, torch.compile, kernel blurred by a depthwise conv (before 2026-11-29)",
     {"steps": 300, "compile": True}, 8, {"_conv_up_folded": _conv_up_folded_depthwise}),
    ("300 steps, eager, no CUDA graph", {"steps": 300, "graph": False}, 1, {}),
    ("300 steps, eager, no CUDA graph, skip image upsampled in polyphase form (2026-11-29 to 30)",
     {"steps": 300, "graph": False}, 1, {"_upsample2x": lambda x, f: stylegan2._upsample2x_polyphase(x)}),
    ("300 steps, lr 0.1 (the default before lr 0.2)", {"steps": 300, "lr": 0.1}, 1, {}),
    ("400 steps", {"steps": 400}, 1, {}),
]


def _variant(label: str, G: Generator, targets: torch.Tensor, lpips: LPIPS, identity: IdentityLoss,
             kw: dict[str, Any], batch: int, seeds: int) -> Row:
    def run(i: int, kw: dict[str, Any] = kw) -> Any:  # eager unless the variant compiles
        kw = {"identity": identity, "compile": False, **kw}
        return invert(G, targets[i:i + batch], perceptual=lpips, **kw)

    # The first run of a shape or code path pays cuDNN autotuning (and compiling): timed apart.
    warmup_s, _ = timed(lambda: run(0, {**kw, "steps": 8}))
    times, ps = [], []
    for i in range(seeds if batch == 1 else 1):
        t, res = timed(lambda i=i: run(i))
        times.append(t)
        ps += res.psnr
    return {"figure": f"variant: {label}", "s_per_selfie": statistics.median(times) / batch,
            "selfies_per_min": 60 * batch / statistics.median(times), "first_run_s": warmup_s,
            "psnr": statistics.mean(ps), "psnr_each": ps}


def bench_variants(dev: torch.device, seeds: int, pick: str) -> Iterator[Row]:
    # In the order picked (the costly ones, e.g. compiling, last), each variant once.
    picks = [p.strip() for p in pick.split(";")] if pick else [""]
    chosen = list({v[0]: v for p in picks for v in VARIANTS if p in v[0]}.values())
    G = random_generator(1024, dev)
    lpips, identity = random_losses(dev)
    _, targets = random_targets(G, list(range(max([seeds] + [batch for _, _, batch, _ in chosen]))))
    for label, kw, batch, patches in chosen:
        try:
            with mock.patch.multiple(stylegan2, **patches) if patches else contextlib.nullcontext():
                row = _variant(label, G, targets, lpips, identity, kw, batch, seeds)
        except Exception as exc:  # one failed experiment must not cost the others their GPU time
            row = {"figure": f"variant: {label}", "error": f"{type(exc).__name__}: {exc}"[:500]}
        yield row


# Kernel name patterns -> what they are, first match wins (cuDNN, ATen and Triton kernel names).
_KERNEL_KINDS = [
    ("Triton (compiled)", re.compile(r"^triton_", re.I)),
    ("layout conversion (NCHW <-> NHWC)", re.compile(r"nchwToNhwc|nhwcToNchw|nchw2nhwc|nhwc2nchw", re.I)),
    ("depthwise conv (the FIR blur)", re.compile(r"depthwise|dwconv", re.I)),
    ("convolution / GEMM", re.compile(r"conv|gemm|xmma|cutlass|wgrad|dgrad|fprop|cudnn", re.I)),
    ("reduction", re.compile(r"reduce|norm|softmax", re.I)),
    ("elementwise", re.compile(r"elementwise|vectorized|unrolled", re.I)),
    ("copy / memset", re.compile(r"copy|memcpy|memset|cat", re.I)),
]


def kernel_shares(times: dict[str, float]) -> dict[str, float]:
    """Per kernel kind (``_KERNEL_KINDS``, else "other"), its percentage of the GPU time."""
    total = sum(times.values()) or 1.0
    shares: dict[str, float] = {}
    for name, t in times.items():
        kind = next((k for k, pattern in _KERNEL_KINDS if pattern.search(name)), "other")
        shares[kind] = shares.get(kind, 0.0) + 100 * t / total
    return dict(sorted(shares.items(), key=lambda kv: -kv[1]))


def bench_profile(dev: torch.device) -> Iterator[Row]:
    """Four eager inversion steps at 1024 px, B=1, as they are and through torch.compile: GPU time
    per step and its share per kernel kind (the 20 costliest kernels are printed too)."""
    from torch.profiler import ProfilerActivity, profile

    G = random_generator(1024, dev)
    lpips, identity = random_losses(dev)
    _, targets = random_targets(G, [0])
    for label, compiled in (("eager", False), ("torch.compile", True)):
        def steps(compiled: bool = compiled) -> None:
            invert(G, targets, perceptual=lpips, identity=identity, steps=4, graph=False, compile=compiled)
        try:
            steps()  # autotuning, compiling
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                steps()
        except Exception as exc:  # a failed compile must not cost the eager profile
            yield {"figure": f"profile, {label}", "error": f"{type(exc).__name__}: {exc}"[:500]}
            continue
        events = prof.key_averages()
        print(events.table(sort_by="device_time_total", row_limit=20, max_name_column_width=60))
        times = {e.key: float(e.device_time_total) for e in events}
        yield {"figure": f"profile, {label}: 4 steps + final render, B=1",
               "gpu_ms_per_step": sum(times.values()) / 1e3 / 4, "kernels": len(times),
               "share_pct": {k: round(v, 1) for k, v in kernel_shares(times).items()}}
