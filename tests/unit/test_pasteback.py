"""Pasting an (edited) aligned face back into the original photo, on skimage's astronaut."""

from __future__ import annotations

import io

import numpy as np
import numpy.typing as npt
import pytest
from PIL import Image, ImageDraw

from engine.align import (
    AlignedFace,
    Alignment,
    FaceDetector,
    FaceLandmarks,
    align_face,
    load_photo,
    warp_points,
)
from engine.pasteback import DEFAULT_ERODE, MaskShape, paste_back, paste_mask, side_by_side

SIZE = 256
CHANGED = 40  # levels (of 255) that count as "visibly changed"

Arr = npt.NDArray[np.float64]


@pytest.fixture(scope="module")
def aligned(astronaut: Image.Image, detector: FaceDetector) -> AlignedFace:
    return align_face(astronaut, size=SIZE, detector=detector)


def _arr(im: Image.Image) -> Arr:
    return np.asarray(im, dtype=np.float64)


def _diff(a: Image.Image, b: Image.Image) -> Arr:
    """Largest per-channel absolute difference per pixel.  # [H, W]"""
    return np.abs(_arr(a) - _arr(b)).max(axis=-1)


def _quad_side(al: Alignment) -> float:
    q = np.asarray(al.quad)
    return float(np.hypot(*(q[3] - q[0])))


def _mouth_rect(al: Alignment) -> tuple[float, float, float, float]:
    """A box around the mouth in aligned pixel coordinates: (x0, y0, x1, y1)."""
    ml, mr = warp_points(al.inverse_matrix(), [al.landmarks.mouth_left, al.landmarks.mouth_right])
    cy = (ml[1] + mr[1]) / 2
    return (ml[0] - 6, cy - 12, mr[0] + 6, cy + 12)


def _paint_mouth(face: Image.Image, al: Alignment) -> Image.Image:
    """The aligned face with a pure green box over the mouth (a stand-in for an edit)."""
    edited = face.copy()
    ImageDraw.Draw(edited).rectangle(_mouth_rect(al), fill=(0, 255, 0))
    return edited


def _check_mouth_edit(
    photo: Image.Image, out: Image.Image, al: Alignment, *, tol: float, unedited: Image.Image | None = None
) -> None:
    """The visible change is the green box, at the photo's mouth, and only inside the mask.

    ``unedited`` is the paste of the face before the edit (default: the photo itself).
    """
    changed = _diff(photo if unedited is None else unedited, out) > CHANGED
    mask = paste_mask(al)
    assert changed.sum() > 50
    assert mask[changed].min() > 0.0  # nothing changes outside the mask's support
    assert np.array_equal(np.asarray(out)[mask == 0], np.asarray(photo)[mask == 0])

    ys, xs = np.nonzero(changed)
    lm = al.landmarks
    mouth = (np.asarray(lm.mouth_left) + np.asarray(lm.mouth_right)) / 2
    assert np.hypot(xs.mean() - mouth[0], ys.mean() - mouth[1]) < 3.0
    for corner in (lm.mouth_left, lm.mouth_right):  # both mouth corners are covered
        assert xs.min() < corner[0] < xs.max() and ys.min() < corner[1] < ys.max()

    # Every changed photo pixel maps back into the painted box (up to the resampling blur).
    x0, y0, x1, y1 = _mouth_rect(al)
    back = warp_points(al.inverse_matrix(), np.stack([xs, ys], axis=1))
    assert back[:, 0].min() > x0 - tol and back[:, 0].max() < x1 + tol
    assert back[:, 1].min() > y0 - tol and back[:, 1].max() < y1 + tol
    # ... and it is the box's size in the photo, not stretched or shrunk.
    expected = (x1 - x0 + 1) * (y1 - y0 + 1) * (_quad_side(al) / al.size) ** 2
    assert 0.7 < changed.sum() / expected < 1.3
    assert np.abs(_arr(out)[changed] - [0, 255, 0]).mean() < 40  # and it is green


# --- round trip and edits --------------------------------------------------------------------


def test_unchanged_face_pastes_back_invisibly(astronaut: Image.Image, aligned: AlignedFace) -> None:
    al = aligned.alignment
    out = paste_back(astronaut, aligned.image, al)
    assert out.size == astronaut.size and out.mode == "RGB"

    mask = paste_mask(al)
    face = mask > 0.5
    assert face.sum() > 0.3 * _quad_side(al) ** 2  # the face itself, not a sliver
    err = np.abs(_arr(out) - _arr(astronaut)).mean(axis=-1)
    assert err[face].mean() < 6.0
    assert np.array_equal(np.asarray(out)[mask == 0], np.asarray(astronaut)[mask == 0])
    # A misplaced face would not pass the first check: one shifted by a few pixels is far off.
    shifted = paste_back(
        astronaut,
        aligned.image.transform(
            (SIZE, SIZE), Image.Transform.AFFINE, (1, 0, 6, 0, 1, 0), resample=Image.Resampling.BICUBIC
        ),
        al,
    )
    assert np.abs(_arr(shifted) - _arr(astronaut)).mean(axis=-1)[face].mean() > 2 * err[face].mean()


def test_edit_on_the_mouth_lands_on_the_photo_mouth(astronaut: Image.Image, aligned: AlignedFace) -> None:
    al = aligned.alignment
    out = paste_back(astronaut, _paint_mouth(aligned.image, al), al)
    _check_mouth_edit(astronaut, out, al, tol=4.0 * SIZE / _quad_side(al))


@pytest.mark.parametrize("side", [64, 1024])
def test_face_at_another_resolution_lands_in_the_same_place(
    astronaut: Image.Image, aligned: AlignedFace, side: int
) -> None:
    al = aligned.alignment
    edited = _paint_mouth(aligned.image, al).resize((side, side), Image.Resampling.LANCZOS)
    out = paste_back(astronaut, edited, al)
    assert out.size == astronaut.size
    # A 64 px face is blurrier than the photo everywhere; compare with its unedited paste.
    unedited = paste_back(astronaut, aligned.image.resize((side, side), Image.Resampling.LANCZOS), al)
    tol = 4.0 * max(SIZE / side, SIZE / _quad_side(al))
    _check_mouth_edit(astronaut, out, al, tol=tol, unedited=unedited)


def test_upscaled_face_still_pastes_back_invisibly(astronaut: Image.Image, aligned: AlignedFace) -> None:
    al = aligned.alignment
    big = aligned.image.resize((1024, 1024), Image.Resampling.BICUBIC)
    out = paste_back(astronaut, big, al)
    face = paste_mask(al) > 0.5
    assert np.abs(_arr(out) - _arr(astronaut)).mean(axis=-1)[face].mean() < 6.0


def test_large_face_is_shrunk_without_moire(astronaut: Image.Image, aligned: AlignedFace) -> None:
    # A 1024 px face into a ~170 px face region: fine detail must average out, not alias.
    checker = (np.indices((1024, 1024)).sum(axis=0) % 2 * 255).astype(np.uint8)
    face = Image.fromarray(np.repeat(checker[..., None], 3, axis=2))
    out = _arr(paste_back(astronaut, face, aligned.alignment))
    core = paste_mask(aligned.alignment) == 1.0
    assert np.abs(out[core] - 127.5).max() < 12.0


def test_exif_rotated_photo_is_pasted_upright(
    astronaut: Image.Image, aligned: AlignedFace, detector: FaceDetector
) -> None:
    upright = astronaut.crop((0, 0, 512, 400))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view"
    buf = io.BytesIO()
    upright.transpose(Image.Transpose.ROTATE_90).save(buf, "PNG", exif=exif)  # lossless
    photo = load_photo(buf.getvalue())
    assert photo.size == (512, 400)
    assert np.array_equal(np.asarray(photo), np.asarray(upright))

    result = align_face(photo, size=SIZE, detector=detector)
    al = result.alignment
    out = paste_back(photo, _paint_mouth(result.image, al), al)
    assert out.size == (512, 400)
    _check_mouth_edit(upright, out, al, tol=4.0 * SIZE / _quad_side(al))
    # Same place as in the unrotated photo (the crop kept the top-left corner).
    mouth_here = np.asarray(al.landmarks.mouth_left)
    assert np.hypot(*(mouth_here - aligned.alignment.landmarks.mouth_left)) < 3.0

    stored = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")  # the sideways pixels as stored
    with pytest.raises(ValueError, match="upright"):
        paste_back(stored, result.image, al)


# --- exact geometry on a synthetic alignment ---------------------------------------------------


def _synthetic(*, size: int, angle_deg: float, scale: float, centre: tuple[float, float]) -> Alignment:
    """An alignment whose aligned square is rotated and scaled about ``centre`` in a photo."""
    a = np.deg2rad(angle_deg)
    lin = scale * np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    c = (size - 1) / 2
    t = np.asarray(centre) - lin @ [c, c]
    m = np.concatenate([lin, t[:, None]], axis=1)
    corners = warp_points(m, [(-0.5, -0.5), (-0.5, size - 0.5), (size - 0.5, size - 0.5), (size - 0.5, -0.5)])
    q0, q1, q2, q3 = (tuple(p) for p in corners.tolist())
    lm = FaceLandmarks((0, 0), (0, 0), (0, 0), (0, 0), (0, 0), box=(0, 0, 1, 1), score=1.0)
    r0, r1 = m.tolist()
    return Alignment(
        size=size,
        quad=(q0, q1, q2, q3),
        matrix=(tuple(r0), tuple(r1)),
        photo_size=(600, 500),
        landmarks=lm,
        faces_found=1,
    )


@pytest.mark.parametrize("side", [50, 100, 400])
def test_a_spot_lands_exactly_where_the_alignment_says(side: int) -> None:
    al = _synthetic(size=100, angle_deg=30.0, scale=2.0, centre=(310.0, 240.0))
    spot = np.array([0.62, 0.42])  # normalised aligned position (0..1 across the square)
    u = np.arange(side) + 0.5
    g = np.exp(-((u[None, :] / side - spot[0]) ** 2 + (u[:, None] / side - spot[1]) ** 2) / (2 * 0.03**2))
    face = Image.fromarray(np.repeat(np.rint(g * 255)[..., None], 3, axis=2).astype(np.uint8))
    photo = Image.new("RGB", al.photo_size, (0, 0, 0))

    out = _arr(paste_back(photo, face, al))[..., 1]
    ys, xs = np.mgrid[: out.shape[0], : out.shape[1]]
    found = np.array([(out * xs).sum(), (out * ys).sum()]) / out.sum()
    want = warp_points(al.matrix, spot * al.size - 0.5)[0]
    assert np.hypot(*(found - want)) < 0.3, (found, want)


# --- the mask ---------------------------------------------------------------------------------


def test_mask_is_one_on_the_face_zero_far_away_and_soft_between(aligned: AlignedFace) -> None:
    al = aligned.alignment
    mask = paste_mask(al)
    h, w = mask.shape
    assert (w, h) == al.photo_size and mask.dtype == np.float32
    assert mask.min() >= 0.0 and mask.max() <= 1.0
    for x, y in [(0, 0), (w - 1, 0), (0, h - 1), (w - 1, h - 1)]:
        assert mask[y, x] == 0.0
    cx, cy = np.rint(warp_points(al.matrix, [(SIZE - 1) / 2, (SIZE - 1) / 2])[0]).astype(int)
    assert mask[cy, cx] == 1.0
    assert ((mask > 0.05) & (mask < 0.95)).sum() > 100  # a soft edge, not a hard cut

    # Falls off from the face centre towards every corner without bumps.
    for x, y in [(0, 0), (w - 1, 0), (0, h - 1), (w - 1, h - 1)]:
        t = np.linspace(0, 1, 400)
        vals = mask[np.rint(cy + t * (y - cy)).astype(int), np.rint(cx + t * (x - cx)).astype(int)]
        assert np.all(np.diff(vals) <= 1e-3), (x, y)


@pytest.mark.parametrize("shape", ["face", "square"])
def test_mask_never_reaches_the_crops_padded_border(aligned: AlignedFace, shape: MaskShape) -> None:
    al = aligned.alignment
    for erode in (DEFAULT_ERODE, 0.15):
        mask = paste_mask(al, erode=erode, shape=shape)
        ys, xs = np.nonzero(mask > 0)
        back = warp_points(al.inverse_matrix(), np.stack([xs, ys], axis=1))  # aligned pixel coords
        margin = erode * SIZE - 0.5 - SIZE / _quad_side(al)  # less one photo pixel
        assert back.min() > margin and back.max() < SIZE - 1 - margin


def test_square_mask_covers_more_than_the_face_mask(aligned: AlignedFace) -> None:
    face = paste_mask(aligned.alignment, shape="face")
    square = paste_mask(aligned.alignment, shape="square")
    assert square.sum() > 1.2 * face.sum()
    assert np.all(square[face > 0] > 0)


# --- errors and panels -------------------------------------------------------------------------


def test_bad_arguments_are_refused(astronaut: Image.Image, aligned: AlignedFace) -> None:
    al = aligned.alignment
    with pytest.raises(ValueError, match="512x512"):
        paste_back(astronaut.resize((256, 256)), aligned.image, al)
    with pytest.raises(ValueError, match="square"):
        paste_back(astronaut, aligned.image.crop((0, 0, SIZE, SIZE - 1)), al)
    with pytest.raises(ValueError, match="erode"):
        paste_back(astronaut, aligned.image, al, erode=0.6)
    with pytest.raises(ValueError, match="feather"):
        paste_mask(al, feather=-0.1)


def test_side_by_side_panel() -> None:
    red = Image.new("RGB", (100, 50), (255, 0, 0))
    blue = Image.new("RGB", (30, 60), (0, 0, 255))
    panel = side_by_side([red, blue], height=120, gap=10)
    assert panel.size == (240 + 10 + 60, 120)
    px = np.asarray(panel)
    assert (px[:, :240] == [255, 0, 0]).all()
    assert (px[:, 240:250] == 255).all()  # white gap
    assert (px[:, 250:] == [0, 0, 255]).all()
    with pytest.raises(ValueError):
        side_by_side([], height=100)
