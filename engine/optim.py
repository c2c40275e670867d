"""Latent optimisation loop: Adam on a warm-up + cosine schedule, replayed as a CUDA graph on GPUs.

At batch 1 one StyleGAN2 step (forward, backward, update) is about a thousand small kernels, so
the GPU waits on Python and kernel launches. On CUDA the whole step is captured once in a CUDA
graph and replayed (the learning rate is a device tensor refreshed between replays); on the CPU,
or with ``graph=False``, the same step runs eagerly. Both compute the same function.

``loss_fn()`` must compute a per-sample loss ``[B]`` from the parameters and tensors that stay
in place between steps (no host synchronisation inside, no new shapes): that is what lets it be
captured.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence

import torch
from torch._dynamo.exc import BackendCompilerFailed

__all__ = ["LossFn", "adam_steps", "batch_bucket", "lr_at", "pad_rows", "padded_size"]

LossFn = Callable[[], torch.Tensor]  # per-sample loss [B] from the current parameters
_WARMUP = 3  # eager steps before capture (also real steps): lets allocators and cuDNN settle
log = logging.getLogger("stylebot.engine")
_compile_failed = False  # torch.compile failed once in this process: later steps are not compiled


_RECOMPILE_LIMIT = 64


def _allow_recompiles() -> None:
    """Each padded batch size compiles graphs of its own for the same step function. Past
    dynamo's default limit (8 per function: the fifth batch size, seen on an H200) it would
    silently run the step uncompiled."""
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, _RECOMPILE_LIMIT)


def batch_bucket(n: int) -> int:
    """The batch size a batch of ``n`` runs at on a GPU: the next power of two.

    Every new batch size costs a worker about 20 s the first time (cuDNN autotuning of every
    convolution, forward and backward, at 1024 px on an H200), and partial batches come in every
    size; padded to powers of two there are five up to 16, warmed up when the worker starts.
    """
    return 1 << max(n - 1, 0).bit_length()


def padded_size(b: int, device: torch.device, pad: bool | None) -> int:
    """How many rows a batch of ``b`` runs with: ``batch_bucket(b)`` when padding (``pad``; by
    default on CUDA devices), else ``b``."""
    return batch_bucket(b) if (device.type == "cuda" if pad is None else pad) else b


def pad_rows(x: torch.Tensor, n: int) -> torch.Tensor:
    """``x`` with its last row repeated up to ``n`` rows (each row is optimised on its own, so
    the copies change nothing for the real ones)."""
    return x if x.shape[0] >= n else torch.cat([x, x[-1:].expand(n - x.shape[0], *x.shape[1:])])


def lr_at(step: int, steps: int, *, lr: float, rampup: float = 0.05, rampdown: float = 0.25) -> float:
    """Linear warm-up over the first ``rampup`` fraction, cosine decay over the last ``rampdown``."""
    t = step / max(steps, 1)
    ramp = min(1.0, (1.0 - t) / rampdown)
    ramp = 0.5 - 0.5 * math.cos(ramp * math.pi)
    return lr * ramp * min(1.0, t / rampup) if rampup > 0 else lr * ramp


def adam_steps(
    params: Sequence[torch.Tensor],
    loss_fn: LossFn,
    *,
    steps: int,
    lr: float,
    rampup: float = 0.05,
    post_step: Callable[[], None] | None = None,
    on_step: Callable[[int, torch.Tensor], None] | None = None,
    report_every: int = 1,
    graph: bool | None = None,
    compile: bool = False,
) -> None:
    """Run ``steps`` Adam steps on ``params`` (leaf tensors with ``requires_grad``).

    ``post_step()`` runs after each update (in-place projections, e.g. renormalising noise).
    ``on_step(step, loss)`` gets the 1-based step and the per-sample loss [B] (a device tensor:
    reading it synchronises) every ``report_every`` steps and after the last one.
    ``graph``: None = on CUDA devices; True/False force it.
    ``compile``: run ``loss_fn`` through ``torch.compile`` (Inductor fuses the elementwise work
    between convolutions, forward and backward; it compiles once per batch shape, cached on disk,
    during the eager warm-up steps, so the CUDA graph captures the compiled kernels). Off by
    default: BENCHMARKS.md says what it has been measured to buy. If compiling fails (Triton
    needs a C compiler at run time, an operator may be unsupported), it is logged and this and
    later steps in the process run uncompiled: slower, not broken.
    """
    if steps < 1:
        raise ValueError("steps must be >= 1")
    device = params[0].device
    use_graph = (device.type == "cuda") if graph is None else graph
    use_graph = use_graph and steps > _WARMUP + 1
    if compile:
        _allow_recompiles()
    step_fn = torch.compile(loss_fn, dynamic=False) if compile and not _compile_failed else loss_fn
    lr_now = torch.tensor(lr_at(0, steps, lr=lr, rampup=rampup), device=device)
    opt = torch.optim.Adam(params, lr=lr_now if use_graph else float(lr_now), capturable=use_graph)

    def forward_backward() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        loss = step_fn()
        loss.sum().backward()  # the compiled backward is compiled here, on its first call
        return loss

    def one_step() -> torch.Tensor:
        global _compile_failed
        nonlocal step_fn
        try:
            loss = forward_backward()
        except BackendCompilerFailed as exc:
            if step_fn is loss_fn:
                raise
            log.warning("torch.compile failed (%s); optimising uncompiled from now on",
                        type(exc.inner_exception).__name__)
            _compile_failed = True
            step_fn = loss_fn
            loss = forward_backward()
        opt.step()
        if post_step is not None:
            with torch.no_grad():
                post_step()
        return loss.detach()

    def report(step: int, loss: torch.Tensor) -> None:
        if on_step is not None and (step % report_every == 0 or step == steps):
            on_step(step, loss)

    if not use_graph:
        for step in range(steps):
            for group in opt.param_groups:
                group["lr"] = lr_at(step, steps, lr=lr, rampup=rampup)
            report(step + 1, one_step())
        return

    # The capture stream is made on the thread's current device, which is cuda:0 in a worker thread
    # whatever device the engine runs on: capturing work for cuda:1 there fails.
    with torch.cuda.device(device):
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for step in range(_WARMUP):
                lr_now.fill_(lr_at(step, steps, lr=lr, rampup=rampup))
                loss = one_step()
        torch.cuda.current_stream(device).wait_stream(side)
        report(_WARMUP, loss)
        g = torch.cuda.CUDAGraph()
        lr_now.fill_(lr_at(_WARMUP, steps, lr=lr, rampup=rampup))
        opt.zero_grad(set_to_none=True)
        # thread_local: another thread may use the GPU meanwhile (a worker compiles the next batch
        # size in the background while it serves).
        with torch.cuda.graph(g, capture_error_mode="thread_local"):
            loss = one_step()  # captured, not run: the first replay below is step _WARMUP
        for step in range(_WARMUP, steps):
            lr_now.fill_(lr_at(step, steps, lr=lr, rampup=rampup))
            g.replay()
            report(step + 1, loss)
