"""Photo loading, face detection (MTCNN) and FFHQ-style face alignment.

Coordinate convention used everywhere in this module (landmarks, ``quad``, ``matrix``):
**pixel centres sit at integer coordinates**. The pixel in column ``i``, row ``j`` of an image
has its centre at ``(x, y) = (i, j)`` and covers ``[i - 0.5, i + 0.5] x [j - 0.5, j + 0.5]``;
this is numpy indexing order ``arr[j, i]``. So the aligned image of side ``size`` covers
``[-0.5, size - 0.5]`` on both axes, and its centre is ``((size - 1) / 2, (size - 1) / 2)``.

The FFHQ ``quad`` is the aligned square's outline in the photo: its corners are the photo
positions of the aligned image's outer corners ``(-0.5, -0.5)``, ``(-0.5, size - 0.5)``,
``(size - 0.5, size - 0.5)`` and ``(size - 0.5, -0.5)``.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from facenet_pytorch import MTCNN
from PIL import Image, ImageFilter, ImageOps

from engine.errors import BadImageError, NoFaceError

__all__ = [
    "AlignedFace",
    "Alignment",
    "FaceDetector",
    "FaceLandmarks",
    "align_face",
    "ffhq_quad",
    "load_photo",
    "warp_points",
]

Point = tuple[float, float]
Quad = tuple[Point, Point, Point, Point]
Matrix = tuple[tuple[float, float, float], tuple[float, float, float]]
FloatArray = npt.NDArray[np.float64]

_MIN_PHOTO_SIDE = 32
_MIN_ALIGN_SIZE = 16


def load_photo(source: str | Path | bytes, *, max_pixels: int = 40_000_000) -> Image.Image:
    """Read a photo into an upright RGB image.

    EXIF orientation is applied, transparency is composited on white, grayscale / palette /
    CMYK / 16-bit images become 8-bit RGB, and an animated image gives its first frame.
    The pixel count is checked from the header, before any pixels are decoded; Pillow's
    decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``) applies as well.

    Raises:
        BadImageError: the file cannot be opened or decoded, is too large (over ``max_pixels``
            or a decompression bomb), or is smaller than 32 px on a side.
    """
    if isinstance(source, bytes):
        if not source:
            raise BadImageError("The file is empty; please send a photo.")
        name = "This file"
        fp: io.BytesIO | Path = io.BytesIO(source)
    else:
        fp = Path(source)
        name = f"'{fp.name}'"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(fp)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise BadImageError(f"{name} is too large to process (too many pixels).") from e
    except (FileNotFoundError, IsADirectoryError, PermissionError) as e:
        raise BadImageError(f"Cannot open {fp}: {e.strerror or e}.") from e
    except Exception as e:  # Pillow raises many exception types on malformed headers.
        raise BadImageError(
            f"{name} is not an image I can read; please send a JPEG, PNG or WebP photo."
        ) from e

    with im:
        w, h = im.size
        if w * h > max_pixels:
            raise BadImageError(
                f"{name} is too large ({w}x{h} pixels); the limit is "
                f"{max_pixels / 1e6:g} megapixels."
            )
        if min(w, h) < _MIN_PHOTO_SIDE:
            raise BadImageError(
                f"{name} is too small ({w}x{h} pixels); please send a photo at least "
                f"{_MIN_PHOTO_SIDE} pixels on each side."
            )
        try:
            im.seek(0)
            im.load()
            return _to_rgb(ImageOps.exif_transpose(im))
        except Exception as e:  # Decoders raise OSError, ValueError, SyntaxError, struct.error...
            raise BadImageError(
                f"{name} could not be decoded; it may be truncated or corrupt."
            ) from e


def _to_rgb(im: Image.Image) -> Image.Image:
    """8-bit RGB from any Pillow mode; alpha is composited on white."""
    if im.mode == "RGB":
        return im
    if im.mode.startswith("I") or im.mode == "F":
        # 32-bit int / float / 16-bit gray: Pillow's convert() would clip, so scale 16-bit data.
        arr = np.asarray(im, dtype=np.float64)
        if im.mode.startswith("I;16") or (arr.size and arr.max() > 255):
            arr = arr / 257.0
        gray = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


@dataclass(frozen=True)
class FaceLandmarks:
    """The five MTCNN landmarks of one face, in photo pixel coordinates (see module doc).

    "Left" and "right" are as seen in the image, not from the person's point of view: for an
    upright frontal face ``eye_left`` has the smaller x (it is the person's right eye). This is
    MTCNN's order ``[left eye, right eye, nose, mouth left, mouth right]`` and the order the
    FFHQ recipe expects. ``box`` is ``(x0, y0, x1, y1)``; ``score`` is MTCNN's probability.
    """

    eye_left: Point
    eye_right: Point
    nose: Point
    mouth_left: Point
    mouth_right: Point
    box: tuple[float, float, float, float]
    score: float

    def points(self) -> FloatArray:
        """The five points as an array, in field order.  # [5, 2]"""
        return np.array(
            [self.eye_left, self.eye_right, self.nose, self.mouth_left, self.mouth_right],
            dtype=np.float64,
        )

    def to_json(self) -> dict[str, Any]:
        return {f: getattr(self, f) if f == "score" else list(getattr(self, f)) for f in _LM_FIELDS}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> FaceLandmarks:
        x0, y0, x1, y1 = (float(v) for v in d["box"])
        el, er, nose, ml, mr = (_point(d[f]) for f in _LM_FIELDS[:5])
        return cls(el, er, nose, ml, mr, box=(x0, y0, x1, y1), score=float(d["score"]))


_LM_FIELDS = ("eye_left", "eye_right", "nose", "mouth_left", "mouth_right", "box", "score")


@dataclass(frozen=True)
class Alignment:
    """Where an aligned face came from in its photo; enough to paste an edit back.

    ``matrix`` maps aligned-image pixel coordinates ``(x, y, 1)`` to photo pixel coordinates
    (pixel centres at integers, see module doc), in the EXIF-transposed photo of
    ``photo_size = (w, h)`` as returned by :func:`load_photo`. ``quad`` is the aligned square's
    outline in the photo in FFHQ order ``c-x-y, c-x+y, c+x+y, c+x-y`` (top-left, bottom-left,
    bottom-right, top-right of the aligned image).
    """

    size: int
    quad: Quad
    matrix: Matrix
    photo_size: tuple[int, int]
    landmarks: FaceLandmarks
    faces_found: int

    def inverse_matrix(self) -> Matrix:
        """The 2x3 affine mapping photo pixel coordinates to aligned-image coordinates."""
        inv = np.linalg.inv(_homogeneous(np.asarray(self.matrix, dtype=np.float64)))
        return _matrix_tuple(inv[:2])

    def to_json(self) -> dict[str, Any]:
        """Plain JSON types only (``json.dumps`` works on the result)."""
        return {
            "size": self.size,
            "quad": [list(p) for p in self.quad],
            "matrix": [list(r) for r in self.matrix],
            "photo_size": list(self.photo_size),
            "landmarks": self.landmarks.to_json(),
            "faces_found": self.faces_found,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Alignment:
        """Inverse of :meth:`to_json`. Raises ValueError on a malformed record."""
        try:
            p0, p1, p2, p3 = (_point(p) for p in d["quad"])
            w, h = (int(v) for v in d["photo_size"])
            return cls(
                size=int(d["size"]),
                quad=(p0, p1, p2, p3),
                matrix=_matrix_tuple(np.asarray(d["matrix"], dtype=np.float64)),
                photo_size=(w, h),
                landmarks=FaceLandmarks.from_json(d["landmarks"]),
                faces_found=int(d["faces_found"]),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"malformed alignment record: {e!r}") from e


@dataclass(frozen=True)
class AlignedFace:
    """An aligned face crop (RGB, ``size`` x ``size``), how it was made, and a note for the
    user (e.g. ``"3 faces found; used the largest."``) or None."""

    image: Image.Image
    alignment: Alignment
    note: str | None


def _point(v: Any) -> Point:
    x, y = v
    return (float(x), float(y))


def _matrix_tuple(m: npt.ArrayLike) -> Matrix:
    a = np.asarray(m, dtype=np.float64)
    if a.shape != (2, 3):
        raise ValueError(f"expected a 2x3 affine matrix, got shape {a.shape}")
    r0, r1 = a.tolist()
    return ((r0[0], r0[1], r0[2]), (r1[0], r1[1], r1[2]))


def _homogeneous(m: FloatArray) -> FloatArray:
    """[2, 3] affine -> [3, 3]."""
    return np.vstack([m, [0.0, 0.0, 1.0]])


def warp_points(matrix: npt.ArrayLike, pts: npt.ArrayLike) -> FloatArray:
    """Apply a 2x3 affine to points ``[N, 2]`` (or one point ``[2]``); returns ``[N, 2]``."""
    m = np.asarray(matrix, dtype=np.float64)
    if m.shape != (2, 3):
        raise ValueError(f"expected a 2x3 affine matrix, got shape {m.shape}")
    p = np.asarray(pts, dtype=np.float64).reshape(-1, 2)
    return p @ m[:, :2].T + m[:, 2]


def ffhq_quad(landmarks: FaceLandmarks) -> FloatArray:
    """The FFHQ crop square (``recreate_aligned_images`` in NVlabs/ffhq-dataset).  # [4, 2]

    MTCNN's eye points stand in for the means of dlib's six eye landmarks, and its mouth
    corners for ``lm_mouth_outer[0]`` and ``[6]``.
    """
    eye_left = np.asarray(landmarks.eye_left, dtype=np.float64)
    eye_right = np.asarray(landmarks.eye_right, dtype=np.float64)
    mouth_left = np.asarray(landmarks.mouth_left, dtype=np.float64)
    mouth_right = np.asarray(landmarks.mouth_right, dtype=np.float64)

    eye_avg = (eye_left + eye_right) * 0.5
    eye_to_eye = eye_right - eye_left
    mouth_avg = (mouth_left + mouth_right) * 0.5
    eye_to_mouth = mouth_avg - eye_avg

    x = eye_to_eye - np.flipud(eye_to_mouth) * [-1, 1]
    x /= np.hypot(*x)
    x *= max(np.hypot(*eye_to_eye) * 2.0, np.hypot(*eye_to_mouth) * 1.8)
    y = np.flipud(x) * [-1, 1]
    c = eye_avg + eye_to_mouth * 0.1
    return np.stack([c - x - y, c - x + y, c + x + y, c + x - y])


def _quad_matrix(quad: FloatArray, size: int) -> FloatArray:
    """Affine [2, 3] taking aligned pixel coords to photo coords for a square ``quad``."""
    c = quad.mean(axis=0)
    xv = (quad[3] - quad[0]) * 0.5  # photo vector for +x of the aligned image, half a side
    yv = (quad[1] - quad[0]) * 0.5
    # Aligned pixel x covers [x - 0.5, x + 0.5]: edge -0.5 -> c - xv, edge size - 0.5 -> c + xv.
    lin = np.stack([xv, yv], axis=1) * (2.0 / size)
    t = c - xv - yv + (xv + yv) / size
    return np.concatenate([lin, t[:, None]], axis=1)


class FaceDetector:
    """MTCNN face detector (facenet-pytorch; its weights ship inside the wheel).

    Photos larger than ``max_side`` are downscaled for detection only; landmarks are returned
    in the coordinates of the photo passed in.
    """

    def __init__(
        self,
        *,
        device: str | torch.device = "cpu",
        min_score: float = 0.9,
        max_side: int = 1024,
    ) -> None:
        self._device = torch.device(device)
        self._min_score = min_score
        self._max_side = max_side
        self._mtcnn = MTCNN(keep_all=True, post_process=False, device=self._device).eval()

    def detect(self, photo: Image.Image) -> list[FaceLandmarks]:
        """Faces with score >= ``min_score``, largest box first."""
        rgb = photo if photo.mode == "RGB" else photo.convert("RGB")
        w, h = rgb.size
        scale = max(w, h) / self._max_side
        if scale > 1.0:
            small = rgb.resize(
                (max(1, round(w / scale)), max(1, round(h / scale))),
                Image.Resampling.BILINEAR,
                reducing_gap=3.0,
            )
        else:
            small = rgb
        sx, sy = w / small.width, h / small.height

        boxes, probs, points = self._mtcnn.detect(small, landmarks=True)
        if boxes is None:
            return []
        faces: list[FaceLandmarks] = []
        for box, prob, pts in zip(boxes, probs, points, strict=True):
            if float(prob) < self._min_score:
                continue
            # Back to full-resolution pixel-centre coordinates.
            b = (np.asarray(box, dtype=np.float64).reshape(2, 2) + 0.5) * (sx, sy) - 0.5
            p = (np.asarray(pts, dtype=np.float64) + 0.5) * (sx, sy) - 0.5  # [5, 2]
            el, er, nose, ml, mr = (_point(q) for q in p)
            (bx0, by0), (bx1, by1) = (_point(q) for q in b)
            box_xyxy = (bx0, by0, bx1, by1)
            faces.append(FaceLandmarks(el, er, nose, ml, mr, box=box_xyxy, score=float(prob)))
        faces.sort(key=lambda f: (f.box[2] - f.box[0]) * (f.box[3] - f.box[1]), reverse=True)
        return faces


def align_face(
    photo: Image.Image,
    *,
    size: int,
    detector: FaceDetector,
    min_face_px: int = 48,
) -> AlignedFace:
    """Detect the largest face and crop it FFHQ-style to an RGB ``size`` x ``size`` image.

    ``min_face_px`` is the smallest accepted side of the FFHQ crop square in photo pixels
    (about four times the eye-to-eye distance).

    Raises:
        NoFaceError: no face is found, or the largest one is too small to align.
    """
    if size < _MIN_ALIGN_SIZE:
        raise ValueError(f"size must be at least {_MIN_ALIGN_SIZE}, got {size}")
    rgb = photo if photo.mode == "RGB" else photo.convert("RGB")
    faces = detector.detect(rgb)
    if not faces:
        raise NoFaceError(
            "No face found in this photo. Please send a well-lit photo where your face is "
            "clearly visible and looking at the camera."
        )
    face = faces[0]
    quad = ffhq_quad(face)
    qsize = float(np.hypot(*(quad[3] - quad[0])))
    if qsize < min_face_px:
        eyes = math.dist(face.eye_left, face.eye_right)
        raise NoFaceError(
            f"The face in this photo is too small to use (about {eyes:.0f} px between the "
            "eyes). Please send a closer or higher-resolution photo."
        )
    q0, q1, q2, q3 = (_point(p) for p in quad)
    alignment = Alignment(
        size=size,
        quad=(q0, q1, q2, q3),
        matrix=_matrix_tuple(_quad_matrix(quad, size)),
        photo_size=rgb.size,
        landmarks=face,
        faces_found=len(faces),
    )
    image = _resample(rgb, np.asarray(alignment.matrix, dtype=np.float64), size=size)
    note = f"{len(faces)} faces found; used the largest." if len(faces) > 1 else None
    return AlignedFace(image=image, alignment=alignment, note=note)


def _translate(tx: float, ty: float) -> FloatArray:
    return np.array([[1.0, 0.0, tx], [0.0, 1.0, ty], [0.0, 0.0, 1.0]])


def _resample(photo: Image.Image, matrix: FloatArray, *, size: int) -> Image.Image:
    """Sample ``photo`` through ``matrix`` [2, 3] (aligned -> photo) into ``size`` x ``size``.

    Follows the FFHQ steps: crop around the quad and shrink it (antialiased) when the quad is
    much larger than the render, reflect-pad with blur and median blending where the quad
    leaves the photo, then render at 2x with bicubic sampling and downsample with Lanczos.
    """
    render = 2 * size
    # The 2x render's pixel centre r sits at aligned coordinate (r + 0.5) / 2 - 0.5.
    to_photo = _homogeneous(matrix) @ np.array(
        [[0.5, 0.0, -0.25], [0.0, 0.5, -0.25], [0.0, 0.0, 1.0]]
    )  # render -> photo [3, 3]
    corners = [(-0.5, -0.5), (-0.5, size - 0.5), (size - 0.5, size - 0.5), (size - 0.5, -0.5)]
    quad = warp_points(matrix, corners)  # [4, 2]
    qsize = float(np.hypot(*(quad[3] - quad[0])))

    # 1. Crop to the quad plus a border, shrinking when the quad is larger than the render.
    pw, ph = photo.size
    border = max(round(qsize * 0.1), 3)
    x0 = min(max(math.floor(quad[:, 0].min()) - border, 0), pw - 1)
    y0 = min(max(math.floor(quad[:, 1].min()) - border, 0), ph - 1)
    x1 = max(min(math.ceil(quad[:, 0].max()) + border + 1, pw), x0 + 1)
    y1 = max(min(math.ceil(quad[:, 1].max()) + border + 1, ph), y0 + 1)
    shrink = qsize / render
    if shrink > 1.0:
        cw, ch = x1 - x0, y1 - y0
        nw, nh = max(round(cw / shrink), 1), max(round(ch / shrink), 1)
        work = photo.resize((nw, nh), Image.Resampling.LANCZOS, box=(x0, y0, x1, y1))
        sx, sy = cw / nw, ch / nh
    else:
        work = photo.crop((x0, y0, x1, y1))
        sx = sy = 1.0
    # work pixel centre i -> photo x0 + (i + 0.5) * sx - 0.5
    work_to_photo = np.array(
        [[sx, 0.0, x0 + 0.5 * sx - 0.5], [0.0, sy, y0 + 0.5 * sy - 0.5], [0.0, 0.0, 1.0]]
    )
    to_work = np.linalg.solve(work_to_photo, to_photo)
    quad_work = warp_points(np.linalg.solve(work_to_photo, _homogeneous(matrix))[:2], corners)

    # 2. Reflect-pad where the quad leaves the photo.
    work, (pad_left, pad_top) = _pad_reflect(work, quad_work, qsize / max(sx, sy))
    to_work = _translate(pad_left, pad_top) @ to_work

    # 3. Render at 2x (Pillow samples pixel centres at +0.5), then downsample.
    pil = _translate(0.5, 0.5) @ to_work @ _translate(-0.5, -0.5)
    data = tuple(float(v) for v in pil[:2].ravel())
    out = work.transform(
        (render, render), Image.Transform.AFFINE, data, resample=Image.Resampling.BICUBIC
    )
    return out.resize((size, size), Image.Resampling.LANCZOS)


def _pad_reflect(
    work: Image.Image, quad: FloatArray, qsize: float
) -> tuple[Image.Image, tuple[int, int]]:
    """FFHQ's padding: reflect, then fade to a blurred copy and the median colour outward.

    Returns the padded image and the (left, top) offset of the original pixels in it.
    Only the sides the quad actually leaves are padded, so real content is never blurred.
    """
    w, h = work.size
    border = max(round(qsize * 0.1), 3)
    need = (
        -math.floor(quad[:, 0].min()) + border,
        -math.floor(quad[:, 1].min()) + border,
        math.ceil(quad[:, 0].max()) - w + 1 + border,
        math.ceil(quad[:, 1].max()) - h + 1 + border,
    )
    if max(need) <= border - 4:
        return work, (0, 0)
    least = round(qsize * 0.3)
    left, top, right, bottom = (max(n, least) if n > 0 else 0 for n in need)

    arr = np.asarray(work, dtype=np.float32)
    arr = np.pad(arr, ((top, bottom), (left, right), (0, 0)), mode="reflect")  # [H, W, 3]
    hh, ww = arr.shape[:2]
    xs = np.arange(ww, dtype=np.float32)
    ys = np.arange(hh, dtype=np.float32)
    # mask: 0 at the photo's edge, 1 at the padded edge, negative inside (sides not padded: -1).
    mx = np.maximum(_ramp(xs, left), _ramp(ww - 1 - xs, right))
    my = np.maximum(_ramp(ys, top), _ramp(hh - 1 - ys, bottom))
    mask = np.maximum(mx[None, :], my[:, None])[..., None]  # [H, W, 1]

    blur = max(qsize * 0.02, 0.5)
    padded = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))
    blurred = np.asarray(padded.filter(ImageFilter.GaussianBlur(blur)), dtype=np.float32)
    arr += (blurred - arr) * np.clip(mask * 3.0 + 1.0, 0.0, 1.0)
    median = np.median(arr[::2, ::2].reshape(-1, 3), axis=0)
    arr += (median - arr) * np.clip(mask, 0.0, 1.0)
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8)), (left, top)


def _ramp(dist: npt.NDArray[np.float32], pad: int) -> npt.NDArray[np.float32]:
    if pad <= 0:
        return np.full_like(dist, -1.0)
    return 1.0 - dist / np.float32(pad)
