"""Conversions between PIL images, uint8 arrays and generator tensors in [-1, 1]."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

__all__ = ["pil_to_tensor", "tensor_to_pil", "tensor_to_uint8"]


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
