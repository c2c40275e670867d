"""Conversions between PIL images, uint8 arrays and generator tensors in [-1, 1], and image work
spread over threads."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import numpy as np
import torch
from PIL import Image

__all__ = ["map_in_threads", "pil_to_tensor", "tensor_to_pil", "tensor_to_uint8"]

_T = TypeVar("_T")
_R = TypeVar("_R")


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> [1, 3, H, W] float32 in [-1, 1]."""
    arr = np.asarray(img.convert("RGB"), dtype=np.float32)  # [H, W, 3]
    return torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0) / 127.5 - 1.0


def tensor_to_uint8(images: torch.Tensor) -> np.ndarray:
    """[B, 3, H, W] in [-1, 1] -> uint8 [B, H, W, 3] (rounded, clamped)."""
    x = (images.detach().float().clamp(-1, 1) + 1.0) * 127.5
    return x.round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def tensor_to_pil(image: torch.Tensor) -> Image.Image:
    """[3, H, W] or [1, 3, H, W] in [-1, 1] -> RGB PIL image."""
    if image.ndim == 3:
        image = image.unsqueeze(0)
    return Image.fromarray(tensor_to_uint8(image)[0])


def map_in_threads(fn: Callable[[_T], _R], items: Sequence[_T], *, max_threads: int) -> list[_R]:
    """``fn`` over ``items`` on up to ``max_threads`` threads, results in order. For image work
    where Pillow, zlib and numpy release the GIL; one item, or one thread, runs inline."""
    threads = min(len(items), max_threads)
    if threads <= 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(fn, items))
