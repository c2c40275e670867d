"""Photo loading and FFHQ face alignment, on a real face photo (skimage's astronaut), offline."""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
import skimage.data
from PIL import Image

from engine.align import (
    AlignedFace,
    Alignment,
    FaceDetector,
    FaceLandmarks,
    align_face,
    ffhq_quad,
    load_photo,
    warp_points,
)
from engine.errors import BadImageError, NoFaceError

SIZE = 256


@pytest.fixture(scope="module")
def aligned(astronaut: Image.Image, detector: FaceDetector) -> AlignedFace:
    return align_face(astronaut, size=SIZE, detector=detector)


def _encode(im: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _bilinear(img: Image.Image, pts: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Sample ``img`` at pixel-centre coordinates ``pts`` [N, 2] -> [N, C]."""
    arr = np.asarray(img, dtype=np.float64)
    x0 = np.clip(np.floor(pts[:, 0]).astype(int), 0, arr.shape[1] - 2)
    y0 = np.clip(np.floor(pts[:, 1]).astype(int), 0, arr.shape[0] - 2)
    fx = (pts[:, 0] - x0)[:, None]
    fy = (pts[:, 1] - y0)[:, None]
    return (
        arr[y0, x0] * (1 - fx) * (1 - fy)
        + arr[y0, x0 + 1] * fx * (1 - fy)
        + arr[y0 + 1, x0] * (1 - fx) * fy
        + arr[y0 + 1, x0 + 1] * fx * fy
    )


def _key_points(lm: FaceLandmarks) -> npt.NDArray[np.float64]:
    """Eyes and mouth corners [4, 2] (the points the FFHQ recipe uses)."""
    return np.array([lm.eye_left, lm.eye_right, lm.mouth_left, lm.mouth_right])


# --- alignment of a real face --------------------------------------------------------------


def test_astronaut_gives_one_aligned_face(aligned: AlignedFace) -> None:
    assert aligned.alignment.faces_found == 1
    assert aligned.note is None
    assert aligned.image.mode == "RGB"
    assert aligned.image.size == (SIZE, SIZE)
    assert aligned.alignment.photo_size == (512, 512)
    assert aligned.alignment.size == SIZE


def test_aligned_face_is_level_and_where_ffhq_puts_it(
    aligned: AlignedFace, detector: FaceDetector
) -> None:
    faces = detector.detect(aligned.image)
    assert len(faces) == 1
    again = faces[0]
    assert abs(again.eye_left[1] - again.eye_right[1]) <= 2.0

    expected = warp_points(
        aligned.alignment.inverse_matrix(), _key_points(aligned.alignment.landmarks)
    )
    dist = np.hypot(*(_key_points(again) - expected).T)
    assert dist.max() <= 4.0, dist


def test_alignment_follows_the_ffhq_recipe(aligned: AlignedFace) -> None:
    al = aligned.alignment
    lm = al.landmarks
    eye_avg = (np.array(lm.eye_left) + np.array(lm.eye_right)) / 2
    eye_to_eye = np.array(lm.eye_right) - np.array(lm.eye_left)
    eye_to_mouth = (np.array(lm.mouth_left) + np.array(lm.mouth_right)) / 2 - eye_avg
    c = eye_avg + 0.1 * eye_to_mouth
    half_side = max(np.hypot(*eye_to_eye) * 2.0, np.hypot(*eye_to_mouth) * 1.8)

    inv = np.array(al.inverse_matrix())
    centre = (SIZE - 1) / 2
    np.testing.assert_allclose(warp_points(inv, c)[0], [centre, centre], atol=1e-6)
    # A photo vector as long as the recipe's x spans half the aligned image.
    x_dir = np.array(al.quad[3]) - np.array(al.quad[0])
    x_dir /= np.hypot(*x_dir)
    np.testing.assert_allclose(np.hypot(*(inv[:, :2] @ (x_dir * half_side))), SIZE / 2)
    # The quad outlines the aligned image, in FFHQ corner order.
    corners = [(-0.5, -0.5), (-0.5, SIZE - 0.5), (SIZE - 0.5, SIZE - 0.5), (SIZE - 0.5, -0.5)]
    np.testing.assert_allclose(warp_points(inv, al.quad), corners, atol=1e-6)
    np.testing.assert_allclose(np.array(al.quad), ffhq_quad(lm))
    np.testing.assert_allclose(
        warp_points(al.matrix, warp_points(inv, [[3.0, 7.0]])), [[3.0, 7.0]], atol=1e-9
    )


def test_matrix_maps_aligned_pixels_to_their_photo_pixels(
    aligned: AlignedFace, astronaut: Image.Image
) -> None:
    ys, xs = np.mgrid[8 : SIZE - 8 : 3, 8 : SIZE - 8 : 3]
    pts = np.stack([xs.ravel(), ys.ravel()], axis=1).astype(np.float64)
    out = np.asarray(aligned.image, dtype=np.float64)[ys.ravel(), xs.ravel()]

    def error(shift: tuple[float, float]) -> float:
        src = warp_points(aligned.alignment.matrix, pts + shift)
        return float(np.abs(_bilinear(astronaut, src) - out).mean())

    exact = error((0.0, 0.0))
    assert exact < 4.0
    # Off by a single aligned pixel is measurably worse: the paste-back would be visibly off.
    for shift in [(1.0, 0.0), (-1.0, 0.0), (0.0, 1.0), (0.0, -1.0)]:
        assert error(shift) > exact * 1.3


def test_exif_orientation_is_honoured(
    aligned: AlignedFace, astronaut: Image.Image, detector: FaceDetector, tmp_path: Path
) -> None:
    top = 40
    upright = astronaut.crop((0, top, 512, 440))  # 512x400; the quad leaves the top: padded
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view": undoes the CCW rotation of the stored pixels
    path = tmp_path / "phone.jpg"
    upright.transpose(Image.Transpose.ROTATE_90).save(path, "JPEG", quality=95, exif=exif)
    with Image.open(path) as raw:
        assert raw.size == (400, 512)

    photo = load_photo(path)
    assert photo.mode == "RGB"
    assert photo.size == (512, 400)
    diff = np.abs(np.asarray(photo, dtype=np.float64) - np.asarray(upright, dtype=np.float64))
    assert diff.mean() < 4.0

    result = align_face(photo, size=SIZE, detector=detector)
    assert result.alignment.photo_size == (512, 400)
    assert result.image.size == (SIZE, SIZE)
    # The part of the crop above the photo is filled (reflect-padded), not left black.
    assert np.asarray(result.image)[:4].min() > 20
    # Same landmarks as the unrotated run on the full photo, moved by the crop.
    unrotated = aligned.alignment.landmarks.points() - [0, top]
    dist = np.hypot(*(result.alignment.landmarks.points() - unrotated).T)
    assert dist.max() <= 3.0, dist


def test_large_photos_are_downscaled_for_detection_only(
    aligned: AlignedFace, astronaut: Image.Image
) -> None:
    faces = FaceDetector(max_side=256).detect(astronaut)  # detects on a 256 px copy
    assert len(faces) == 1
    # Landmarks come back in the full photo's coordinates.
    dist = np.hypot(*(faces[0].points() - aligned.alignment.landmarks.points()).T)
    assert dist.max() <= 4.0, dist


def test_photo_without_a_face_raises_no_face(detector: FaceDetector) -> None:
    ramp = np.linspace(0, 255, 320)
    gradient = np.stack(np.broadcast_arrays(ramp[None, :], ramp[:, None], 128.0), axis=-1)
    photo = Image.fromarray(gradient.astype(np.uint8)[:240])
    with pytest.raises(NoFaceError, match="No face found"):
        align_face(photo, size=SIZE, detector=detector)


def test_two_faces_uses_the_largest_and_says_so(
    astronaut: Image.Image, detector: FaceDetector
) -> None:
    canvas = Image.new("RGB", (532, 320), (128, 128, 128))
    canvas.paste(astronaut.resize((320, 320), Image.Resampling.LANCZOS), (0, 0))
    canvas.paste(astronaut.resize((192, 192), Image.Resampling.LANCZOS), (340, 60))
    result = align_face(canvas, size=SIZE, detector=detector)
    assert result.alignment.faces_found == 2
    assert result.note is not None
    assert "2 faces" in result.note and "largest" in result.note
    assert all(x < 320 for x, _ in result.alignment.landmarks.points())


def test_too_small_face_raises_no_face(astronaut: Image.Image, detector: FaceDetector) -> None:
    tiny = astronaut.resize((120, 120), Image.Resampling.LANCZOS)  # ~10 px between the eyes
    with pytest.raises(NoFaceError, match="too small"):
        align_face(tiny, size=SIZE, detector=detector)


def test_alignment_json_round_trip(aligned: AlignedFace) -> None:
    record = json.loads(json.dumps(aligned.alignment.to_json()))
    assert Alignment.from_json(record) == aligned.alignment
    with pytest.raises(ValueError, match="malformed"):
        Alignment.from_json({**record, "matrix": [[1, 0, 0]]})


# --- loading photos ------------------------------------------------------------------------


def _png_with_declared_size(width: int, height: int) -> bytes:
    """A valid small PNG whose IHDR (with a correct CRC) claims ``width`` x ``height``."""
    data = bytearray(_encode(Image.new("RGB", (64, 64)), "PNG"))
    ihdr = 8  # signature; then length(4) type(4) data(13) crc(4)
    body = struct.pack(">II", width, height) + bytes(data[ihdr + 16 : ihdr + 21])
    data[ihdr + 8 : ihdr + 21] = body
    data[ihdr + 21 : ihdr + 25] = struct.pack(">I", zlib.crc32(b"IHDR" + body))
    return bytes(data)


_JPEG = _encode(Image.fromarray(skimage.data.astronaut()), "JPEG")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        pytest.param(b"", "empty", id="empty"),
        pytest.param(b"hello, this is not a photo\n" * 10, "not an image", id="text"),
        pytest.param(_JPEG[: len(_JPEG) // 2], "truncated or corrupt", id="truncated-jpeg"),
        pytest.param(_encode(Image.new("RGB", (1, 1)), "PNG"), "too small", id="1x1-png"),
        pytest.param(_png_with_declared_size(8000, 6000), "too large", id="over-max-pixels"),
        pytest.param(_png_with_declared_size(100_000, 100_000), "too large", id="bomb"),
    ],
)
def test_unreadable_photos_raise_bad_image(data: bytes, message: str) -> None:
    with pytest.raises(BadImageError, match=message) as info:
        load_photo(data)
    assert "\n" not in info.value.message


def test_max_pixels_is_checked_before_decoding(astronaut: Image.Image) -> None:
    data = _encode(astronaut, "PNG")
    with pytest.raises(BadImageError, match="512x512"):
        load_photo(data, max_pixels=100_000)
    assert load_photo(data).size == (512, 512)


def test_missing_file_raises_bad_image(tmp_path: Path) -> None:
    with pytest.raises(BadImageError, match="missing.jpg"):
        load_photo(tmp_path / "missing.jpg")


def test_grayscale_loads_as_rgb() -> None:
    gray = Image.fromarray(np.full((48, 64), 77, dtype=np.uint8))
    photo = load_photo(_encode(gray, "PNG"))
    assert photo.mode == "RGB" and photo.size == (64, 48)
    assert photo.getpixel((10, 10)) == (77, 77, 77)


def test_transparency_is_composited_on_white() -> None:
    rgba = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    rgba.paste((200, 10, 10, 255), (0, 0, 32, 64))
    photo = load_photo(_encode(rgba, "PNG"))
    assert photo.mode == "RGB"
    assert photo.getpixel((5, 5)) == (200, 10, 10)
    assert photo.getpixel((50, 5)) == (255, 255, 255)


def test_cmyk_jpeg_loads_as_rgb() -> None:
    cmyk = Image.new("CMYK", (64, 64), (0, 255, 255, 0))  # pure red ink-wise
    photo = load_photo(_encode(cmyk, "JPEG", quality=95))
    assert photo.mode == "RGB"
    r, g, b = photo.getpixel((32, 32))  # type: ignore[misc]
    assert r > 230 and g < 25 and b < 25


def test_16_bit_png_is_scaled_not_clipped() -> None:
    arr = np.zeros((40, 40), dtype=np.uint16)
    arr[:, :20] = 65535
    arr[:, 20:] = 32896  # 128 * 257
    data = _encode(Image.fromarray(arr), "PNG")
    with Image.open(io.BytesIO(data)) as raw:
        assert raw.mode.startswith("I")  # really a 16-bit file
    photo = load_photo(data)
    assert photo.mode == "RGB"
    assert photo.getpixel((5, 5)) == (255, 255, 255)
    assert photo.getpixel((30, 5)) == (128, 128, 128)


def test_animated_gif_gives_first_frame() -> None:
    frames = [Image.new("RGB", (48, 48), c) for c in [(255, 0, 0), (0, 0, 255)]]
    data = _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)
    photo = load_photo(data)
    assert photo.mode == "RGB"
    assert photo.getpixel((10, 10)) == (255, 0, 0)
