"""On a GPU each optimisation step is captured once in a CUDA graph and replayed. Inside a capture
no tensor may be made from host data (``torch.tensor(...)``, a constant copied to the device):
CUDA refuses the copy and the job fails. CI has no GPU, so these tests record every operation a
step dispatches (loss, backward) on the CPU and look for such tensors; ``make gpu-smoke`` runs the
real captures."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from engine import edit, invert, stylegan2
from engine.clip_model import build_demo_clip
from engine.generators import build_demo_generator
from engine.identity import demo_identity
from engine.perceptual import demo_lpips


class _HostTensors(TorchDispatchMode):
    """Records the operations that make a tensor from host data."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func.overloadpacket in (torch.ops.aten.lift_fresh, torch.ops.aten.lift_fresh_copy):
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


def _captured_step(module: Any, run: Callable[[], object], monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Run an optimisation with the eager GPU form of every layer, then one more step of its loss
    and backward under the recorder: what the CUDA graph would capture."""
    steps: list[Callable[[], torch.Tensor]] = []

    def record_loss(params: Any, loss_fn: Callable[[], torch.Tensor], **_: Any) -> None:
        steps.append(loss_fn)

    monkeypatch.setattr(module, "adam_steps", record_loss)
    monkeypatch.setattr(stylegan2, "_upsample2x", stylegan2._upsample2x_zero_insert)
    run()
    (loss_fn,) = steps
    recorder = _HostTensors()
    with recorder:
        loss_fn().sum().backward()
    return recorder.seen


def test_an_inversion_step_makes_no_tensor_from_host_data(monkeypatch: pytest.MonkeyPatch) -> None:
    G = build_demo_generator()
    target = torch.rand(2, 3, G.resolution, G.resolution) * 2 - 1
    seen = _captured_step(invert, lambda: invert.invert(
        G, target, perceptual=demo_lpips(), identity=demo_identity(), steps=5), monkeypatch)
    assert seen == []


def test_an_edit_step_makes_no_tensor_from_host_data(monkeypatch: pytest.MonkeyPatch) -> None:
    G = build_demo_generator()
    clip_model = build_demo_clip()
    with torch.no_grad():
        source = G.mapping(torch.randn(2, G.cfg.z_dim, generator=torch.Generator().manual_seed(1)))
    texts = torch.stack([clip_model.text_embedding("a smile"), clip_model.text_embedding("old")])
    seen = _captured_step(edit, lambda: edit.edit_optimize(
        G, source, texts, encode=clip_model.encode_images, identity=demo_identity(), steps=5,
        l2_weight=[0.008, 0.001]), monkeypatch)
    assert seen == []
