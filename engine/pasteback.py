"""Paste an edited aligned face back into the original photo, and before/after panels.

Coordinates follow :mod:`engine.align` (pixel centres at integers). The blend mask is defined
in *normalised aligned coordinates* ``n = (u + 0.5) / size`` (0..1 across the aligned square,
y down), so it does not depend on the resolution of the face image being pasted; distances in
that space are fractions of the crop's side, and the alignment is a similarity transform, so
they scale uniformly into photo pixels.

The mask (``shape="face"``, the default) is the intersection of

* the aligned square, *eroded* by ``erode`` (a fraction of the side): FFHQ fills the crop's
  border with reflected, blurred padding where the square leaves the photo, and a generator's
  reconstruction of the background never matches the photo, so the border never shows; and
* an ellipse covering the face of an FFHQ crop (forehead to chin, cheek to cheek; centre
  ``(0.5, 0.52)``, semi-axes ``0.35 x 0.44`` of the side). FFHQ alignment puts the eyes near
  ``y = 0.47`` and the mouth near ``y = 0.72``, so this is the same region for every photo.

The edge is soft: the mask is exactly 0 on and outside those outlines and rises with a
smoothstep to exactly 1 at ``feather`` (a fraction of the side) inside them - a gaussian-like
feather with a finite support, so every photo pixel outside the support stays bit-identical.
``shape="square"`` uses only the eroded square (for edits that change hair or background).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt
from PIL import Image

from engine.align import Alignment, warp_points
from engine.images import map_in_threads

__all__ = [
    "DEFAULT_ERODE",
    "DEFAULT_FEATHER",
    "MaskShape",
    "image_grid",
    "paste_back",
    "paste_mask",
    "side_by_side",
]

MaskShape = Literal["face", "square"]

DEFAULT_ERODE = 0.06
"""Margin along the crop's border where the mask is 0, as a fraction of the aligned side."""
DEFAULT_FEATHER = 0.05
"""Width of the mask's soft edge, as a fraction of the aligned side."""

_ELLIPSE_CENTRE = (0.5, 0.52)
_ELLIPSE_AXES = (0.35, 0.44)
_FACE_PAD = 2  # edge-replicated pixels around the face, so bicubic taps never read black
_STRIP = 128  # photo rows per work unit
_MAX_THREADS = 4

_F32 = npt.NDArray[np.float32]
_F64 = npt.NDArray[np.float64]


def paste_back(
    photo: Image.Image,
    face: Image.Image,
    alignment: Alignment,
    *,
    erode: float = DEFAULT_ERODE,
    feather: float = DEFAULT_FEATHER,
    shape: MaskShape = "face",
) -> Image.Image:
    """Put an edited aligned ``face`` back into ``photo`` at the photo's own resolution.

    ``photo`` is the upright RGB photo that :func:`engine.align.load_photo` returned and
    :func:`engine.align.align_face` aligned (its size must be ``alignment.photo_size``).
    ``face`` is a square RGB image of any side (e.g. the generator's resolution); it is taken
    to cover the same square as the aligned crop. It is sampled bicubically through the inverse
    of the alignment transform (shrunk with Lanczos first when the face is smaller in the photo
    than in ``face``) and blended with :func:`paste_mask` in 8 bits (a mask value below 1/510
    keeps the photo pixel too). Only the mask's bounding box is touched, in row strips spread
    over a few threads: every pixel where the mask is 0 keeps its exact original value.

    Returns a new RGB image; ``photo`` is not modified.

    Raises:
        ValueError: the photo's size differs from ``alignment.photo_size``, the face is not
            square, or ``erode`` / ``feather`` are out of range.
    """
    if photo.size != alignment.photo_size:
        w, h = alignment.photo_size
        raise ValueError(
            f"photo is {photo.width}x{photo.height} but the alignment was made on a {w}x{h} "
            "photo; pass the upright photo that load_photo returned"
        )
    if face.width != face.height:
        raise ValueError(f"face must be square, got {face.width}x{face.height}")
    _check_params(erode, feather, shape)
    rgb = photo if photo.mode == "RGB" else photo.convert("RGB")
    out = rgb.copy()
    to_photo = _norm_to_photo(alignment)  # [3, 3]
    x0, y0, x1, y1 = _support_box(alignment, to_photo, erode=erode, shape=shape)
    if x1 <= x0 or y1 <= y0:
        return out

    src = face if face.mode == "RGB" else face.convert("RGB")
    # Photo pixels per face pixel; shrink the face first (antialiased) when it is larger.
    side = src.width
    scale = float(np.hypot(to_photo[0, 0], to_photo[1, 0])) / side
    if scale < 1.0:
        side = max(math.ceil(src.width * scale), 1)
        src = src.resize((side, side), Image.Resampling.LANCZOS)
    # Face pixel centre u -> normalised (u + 0.5) / side; padding shifts u by _FACE_PAD.
    pad = _FACE_PAD
    padded = Image.fromarray(np.pad(np.asarray(src), ((pad, pad), (pad, pad), (0, 0)), mode="edge"))
    off = (0.5 - pad) / side
    face_to_norm = np.array([[1.0 / side, 0.0, off], [0.0, 1.0 / side, off], [0.0, 0.0, 1.0]])
    photo_to_face = np.linalg.inv(to_photo @ face_to_norm)
    photo_to_norm = np.asarray(np.linalg.inv(to_photo), dtype=np.float64)
    params = _MaskParams(photo_to_norm, erode, feather, shape)

    def strip(top: int) -> tuple[tuple[int, int], Image.Image, Image.Image] | None:
        bottom = min(top + _STRIP, y1)
        mask = _mask_block(params, x0, x1, top, bottom)  # [bottom - top, x1 - x0]
        cols = np.flatnonzero(mask.max(axis=0) > 0.5 / 255.0)
        if cols.size == 0:
            return None
        c0, c1 = int(cols[0]), int(cols[-1]) + 1
        # Output pixel centre (i, j) -> photo (x0 + c0 + i, top + j) -> padded face pixel centre;
        # Pillow puts pixel centres at +0.5 on both sides of the mapping.
        pil = _translate(0.5, 0.5) @ photo_to_face @ _translate(x0 + c0 - 0.5, top - 0.5)
        data = tuple(float(v) for v in pil[:2].ravel())
        size = (c1 - c0, bottom - top)
        warped = padded.transform(size, Image.Transform.AFFINE, data, resample=Image.Resampling.BICUBIC)
        alpha = Image.fromarray(np.rint(mask[:, c0:c1] * np.float32(255.0)).astype(np.uint8))
        return (x0 + c0, top), warped, alpha

    # Pillow and numpy release the GIL in these loops, so strips run in parallel.
    for done in map_in_threads(strip, range(y0, y1, _STRIP), max_threads=_MAX_THREADS):
        if done is not None:
            # 8-bit composite: exact where alpha is 0 (photo) or 255 (face).
            corner, warped, alpha = done
            out.paste(warped, corner, alpha)
    return out


def paste_mask(
    alignment: Alignment,
    *,
    erode: float = DEFAULT_ERODE,
    feather: float = DEFAULT_FEATHER,
    shape: MaskShape = "face",
) -> _F32:
    """Where :func:`paste_back` puts the face: ``float32 [H, W]`` in ``[0, 1]`` over the photo.

    0 means the photo pixel is kept exactly, 1 that it comes from the face; see the module
    docstring for the shape. ``erode`` and ``feather`` are fractions of the aligned side.
    """
    _check_params(erode, feather, shape)
    w, h = alignment.photo_size
    full = np.zeros((h, w), dtype=np.float32)
    to_photo = _norm_to_photo(alignment)
    x0, y0, x1, y1 = _support_box(alignment, to_photo, erode=erode, shape=shape)
    if x1 > x0 and y1 > y0:
        params = _MaskParams(np.asarray(np.linalg.inv(to_photo), dtype=np.float64), erode, feather, shape)
        full[y0:y1, x0:x1] = _mask_block(params, x0, x1, y0, y1)
    return full


def side_by_side(images: Sequence[Image.Image], *, height: int, gap: int = 8) -> Image.Image:
    """Images in a row on white, each resized to ``height`` keeping its aspect ratio.

    The width is the sum of the resized widths plus ``gap`` pixels between neighbours.
    """
    if not images:
        raise ValueError("side_by_side needs at least one image")
    if height < 1 or gap < 0:
        raise ValueError(f"height must be >= 1 and gap >= 0, got height={height}, gap={gap}")
    tiles = [
        im.convert("RGB").resize(
            (max(round(im.width * height / im.height), 1), height), Image.Resampling.LANCZOS
        )
        for im in images
    ]
    width = sum(t.width for t in tiles) + gap * (len(tiles) - 1)
    panel = Image.new("RGB", (width, height), (255, 255, 255))
    x = 0
    for t in tiles:
        panel.paste(t, (x, 0))
        x += t.width + gap
    return panel


def image_grid(images: Sequence[Image.Image], *, side: int, gap: int = 8,
               columns: int = 4) -> Image.Image:
    """Square images in rows of up to ``columns`` (left to right, top to bottom), ``side`` px each,
    on white."""
    if not images:
        raise ValueError("image_grid needs at least one image")
    cols = min(columns, len(images))
    rows = -(-len(images) // cols)
    grid = Image.new("RGB", (cols * side + gap * (cols - 1), rows * side + gap * (rows - 1)),
                     (255, 255, 255))
    for i, im in enumerate(images):
        tile = im.convert("RGB").resize((side, side), Image.Resampling.LANCZOS)
        grid.paste(tile, ((i % cols) * (side + gap), (i // cols) * (side + gap)))
    return grid


def _translate(tx: float, ty: float) -> _F64:
    return np.array([[1.0, 0.0, tx], [0.0, 1.0, ty], [0.0, 0.0, 1.0]])


def _norm_to_photo(alignment: Alignment) -> _F64:
    """[3, 3] affine: normalised aligned coordinates -> photo pixel coordinates."""
    m = np.vstack([np.asarray(alignment.matrix, dtype=np.float64), [0.0, 0.0, 1.0]])
    n = float(alignment.size)
    return m @ np.array([[n, 0.0, -0.5], [0.0, n, -0.5], [0.0, 0.0, 1.0]])


def _check_params(erode: float, feather: float, shape: str) -> None:
    if not 0.0 <= erode < 0.5:
        raise ValueError(f"erode must be in [0, 0.5) (a fraction of the face side), got {erode}")
    if not 0.0 <= feather < 0.5:
        raise ValueError(f"feather must be in [0, 0.5) (a fraction of the face side), got {feather}")
    if shape not in ("face", "square"):
        raise ValueError(f"shape must be 'face' or 'square', got {shape!r}")


def _support_box(
    alignment: Alignment, to_photo: _F64, *, erode: float, shape: MaskShape
) -> tuple[int, int, int, int]:
    """Photo box ``(x0, y0, x1, y1)`` (end-exclusive, clipped) holding the mask's support."""
    lo = np.array([erode, erode])
    hi = np.array([1.0 - erode, 1.0 - erode])
    if shape == "face":
        (cx, cy), (ax, ay) = _ELLIPSE_CENTRE, _ELLIPSE_AXES
        lo = np.maximum(lo, [cx - ax, cy - ay])
        hi = np.minimum(hi, [cx + ax, cy + ay])
    corners = warp_points(to_photo[:2], [(lo[0], lo[1]), (lo[0], hi[1]), (hi[0], hi[1]), (hi[0], lo[1])])
    w, h = alignment.photo_size
    x0 = min(max(math.floor(corners[:, 0].min()), 0), w)
    y0 = min(max(math.floor(corners[:, 1].min()), 0), h)
    x1 = max(min(math.ceil(corners[:, 0].max()) + 1, w), x0)
    y1 = max(min(math.ceil(corners[:, 1].max()) + 1, h), y0)
    return x0, y0, x1, y1


@dataclass(frozen=True)
class _MaskParams:
    photo_to_norm: _F64  # [3, 3]
    erode: float
    feather: float
    shape: MaskShape


def _mask_block(p: _MaskParams, x0: int, x1: int, y0: int, y1: int) -> _F32:
    """The mask at the photo pixel centres of ``[x0, x1) x [y0, y1)``.  # [y1 - y0, x1 - x0]"""
    inv = p.photo_to_norm
    xs = np.arange(x0, x1, dtype=np.float64)
    ys = np.arange(y0, y1, dtype=np.float64)
    nx = ((inv[0, 0] * xs)[None, :] + (inv[0, 1] * ys + inv[0, 2])[:, None]).astype(np.float32)
    ny = ((inv[1, 0] * xs)[None, :] + (inv[1, 1] * ys + inv[1, 2])[:, None]).astype(np.float32)

    # Distance inside the eroded square (exact), in fractions of the side; positive inside.
    inside = (0.5 - p.erode) - np.maximum(np.abs(nx - 0.5), np.abs(ny - 0.5))
    if p.shape == "face":
        # First-order distance inside the ellipse: -g / |grad g| with g = ex^2 + ey^2 - 1.
        (cx, cy), (ax, ay) = _ELLIPSE_CENTRE, _ELLIPSE_AXES
        ex = (nx - cx) / ax
        ey = (ny - cy) / ay
        g = ex * ex + ey * ey - 1.0
        grad = 2.0 * np.sqrt((ex / ax) ** 2 + (ey / ay) ** 2)
        inside = np.minimum(inside, -g / np.maximum(grad, 1e-6))
    if p.feather > 0.0:
        t = np.clip(inside / np.float32(p.feather), 0.0, 1.0)
        mask = t * t * (3.0 - 2.0 * t)  # smoothstep: exactly 0 at the outline, 1 at feather
    else:
        mask = (inside > 0.0).astype(np.float32)
    return mask.astype(np.float32, copy=False)
