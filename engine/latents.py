"""Latent files: ``latent.npy`` ([num_ws, w_dim] float32) plus a JSON stamp of the model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from engine.errors import EngineError

__all__ = ["load_latent", "save_latent", "stamp_path"]


def stamp_path(latent_path: Path) -> Path:
    """The sidecar that records which generator made a latent: ``latent.npy`` -> ``latent.json``."""
    return latent_path.with_suffix(".json")


def save_latent(path: str | Path, latent: torch.Tensor, *, model_id: str) -> None:
    path = Path(path)
    arr = latent.detach().cpu().numpy().astype(np.float32)  # [num_ws, w_dim]
    if arr.ndim != 2:
        raise ValueError(f"a latent is [num_ws, w_dim], got {list(arr.shape)}")
    np.save(path, arr, allow_pickle=False)
    stamp = {"model_id": model_id, "num_ws": arr.shape[0], "w_dim": arr.shape[1]}
    stamp_path(path).write_text(json.dumps(stamp) + "\n")


def load_latent(path: str | Path, *, model_id: str, num_ws: int, w_dim: int) -> torch.Tensor:
    """Read a latent for the given generator; refuse one made by another generator."""
    path = Path(path)
    try:
        arr = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise EngineError(f"no such latent file: {path}") from None
    except (ValueError, OSError) as exc:
        raise EngineError(f"{path.name} is not a latent .npy file ({exc})") from None
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.shape != (num_ws, w_dim) or not np.issubdtype(arr.dtype, np.floating):
        raise EngineError(
            f"{path.name} holds a {list(arr.shape)} array; this model needs [{num_ws}, {w_dim}]"
        )
    stamp = stamp_path(path)
    if stamp.exists():
        made_by = json.loads(stamp.read_text()).get("model_id")
        if made_by != model_id:
            raise EngineError(
                f"{path.name} was made by model {made_by}, not the loaded model {model_id}; "
                "use the same --model it was inverted with"
            )
    if not np.isfinite(arr).all():
        raise EngineError(f"{path.name} contains NaN or infinite values")
    return torch.from_numpy(arr.astype(np.float32))
