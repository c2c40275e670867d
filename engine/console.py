"""What the engine's commands share on a terminal: progress bars, status lines, model loading."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

from engine.errors import EngineError
from engine.generators import LoadedGenerator, load_generator, resolve_device

__all__ = ["Bar", "load_model", "output_path", "say"]


class Bar:
    """A tqdm progress bar behind the engine's progress(step, total, info) callback."""

    def __init__(self, desc: str, *, unit: str = "step") -> None:
        self.bar: tqdm[Any] | None = None
        self.desc, self.unit = desc, unit

    def __call__(self, step: int, total: int, info: dict[str, Any]) -> None:
        if self.bar is None:
            self.bar = tqdm(total=total or None, desc=self.desc, unit=self.unit, file=sys.stderr,
                            dynamic_ncols=True, unit_scale=self.unit == "B")
        self.bar.n = step
        shown = {k: f"{v:.3g}" for k, v in info.items() if isinstance(v, float)}
        if shown:
            self.bar.set_postfix(shown, refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def say(text: str) -> None:
    print(text, file=sys.stderr)


def load_model(args: argparse.Namespace) -> LoadedGenerator:
    loaded = load_generator(args.model, device=resolve_device(args.device))
    say(f"model: {loaded.label} [{loaded.model_id}]")
    return loaded


def output_path(name: str) -> Path:
    """An output file path whose folder exists (else a clear error)."""
    path = Path(name)
    if not path.parent.exists():
        raise EngineError(f"output folder does not exist: {path.parent}")
    return path
