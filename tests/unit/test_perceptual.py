"""LPIPS (engine.perceptual) and the identity loss (engine.identity), on CPU.

Real-weight paths use randomly initialised state dicts saved in the real file formats (no
downloads here); the LPIPS linear heads are the real ones shipped in the lpips package.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from bench.stand_ins import random_facenet_state, random_vgg16_state
from engine.errors import CheckpointError
from engine.identity import IdentityLoss, demo_identity, load_identity
from engine.perceptual import (
    LPIPS,
    build_lpips_vgg,
    demo_lpips,
    load_lin_state,
    load_perceptual,
    load_vgg_state,
)

VGG_FILE = "vgg16-397923af.pth"
FACENET_FILE = "20180402-114759-vggface2.pt"


def _smooth_images(b: int, size: int, seed: int) -> torch.Tensor:
    """Face-like test images: low-frequency colour blobs in [-1, 1]. [b, 3, size, size]"""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(b, 3, 6, 6, generator=g) * 2 - 1
    return F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False).clamp(
        -1, 1
    )


def _noise(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("vgg") / VGG_FILE
    # torchvision's vgg16-397923af.pth predates torch 1.6: the legacy (non-zip) serialisation.
    torch.save(random_vgg16_state(seed=1), path, _use_new_zipfile_serialization=False)
    return path


@pytest.fixture(scope="module")
def real_lpips(vgg_file: Path) -> LPIPS:
    # Real VGG16 maths at 64 px keeps the test fast; resizing is tested on its own below.
    vgg_state = torch.load(vgg_file, map_location="cpu", weights_only=True)
    return build_lpips_vgg(vgg_state, load_lin_state(), resize_to=64)


# --- LPIPS maths (demo stand-in: same code, small trunk) ---------------------------------


def test_distance_of_an_image_to_itself_is_zero() -> None:
    x = _smooth_images(2, 256, seed=0)
    d = demo_lpips()(x, x.clone())
    assert d.shape == (2,)
    assert torch.allclose(d, torch.zeros(2), atol=1e-6)


def test_distance_grows_with_noise() -> None:
    lp = demo_lpips()
    x = _smooth_images(1, 256, seed=0)
    n = _noise(tuple(x.shape), seed=1)
    d = [float(lp(x, x + s * n)) for s in (0.05, 0.15, 0.4)]
    assert 0 < d[0] < d[1] < d[2]


def test_distance_is_symmetric() -> None:
    lp = demo_lpips()
    x, y = _smooth_images(3, 128, seed=0), _smooth_images(3, 128, seed=5)
    assert torch.allclose(lp(x, y), lp(y, x), rtol=1e-5, atol=1e-7)
    assert (lp(x, y) > 0).all()


def test_gradients_reach_the_input_but_not_the_weights() -> None:
    lp = demo_lpips()
    target = _smooth_images(1, 128, seed=0)
    x = (target + 0.2 * _noise(tuple(target.shape), seed=2)).requires_grad_(True)
    lp(x, target).sum().backward()
    assert x.grad is not None
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(not p.requires_grad and p.grad is None for p in lp.parameters())
    # One gradient step towards the target lowers the distance: usable as a loss.
    with torch.no_grad():
        stepped = x - 0.5 * x.grad / x.grad.abs().max()
        assert lp(stepped, target) < lp(x, target)


def test_large_inputs_are_area_resized_first() -> None:
    lp = demo_lpips(resize_to=256)
    x, y = _smooth_images(2, 512, seed=0), _smooth_images(2, 512, seed=3)
    x = x + 0.3 * _noise(tuple(x.shape), seed=4)  # fine detail that resizing averages away
    small = lp(F.interpolate(x, size=256, mode="area"), F.interpolate(y, size=256, mode="area"))
    assert torch.allclose(lp(x, y), small, rtol=1e-5)
    lp.resize_to = None
    assert not torch.allclose(lp(x, y), small, rtol=1e-3)


def test_demo_is_deterministic_and_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    a, b = demo_lpips(), demo_lpips()
    assert torch.equal(torch.rand(3), expected)
    x, y = _smooth_images(2, 96, seed=0), _smooth_images(2, 96, seed=1)
    assert torch.equal(a(x, y), b(x, y))
    assert not torch.equal(demo_lpips(seed=7)(x, y), a(x, y))


def test_shape_mismatch_is_refused() -> None:
    with pytest.raises(ValueError, match="differ"):
        demo_lpips()(torch.zeros(1, 3, 64, 64), torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        demo_lpips()(torch.zeros(3, 64, 64), torch.zeros(3, 64, 64))


# --- real VGG16 layout + shipped lpips heads -------------------------------------------------


def test_build_lpips_vgg_from_a_saved_torchvision_state_dict(real_lpips: LPIPS) -> None:
    assert real_lpips.is_demo is False and real_lpips.name == "lpips-vgg16"
    x, y = _smooth_images(2, 64, seed=0), _smooth_images(2, 64, seed=1)
    d = real_lpips(x, y)
    assert d.shape == (2,) and torch.isfinite(d).all() and (d > 0).all()
    assert torch.allclose(real_lpips(x, x), torch.zeros(2), atol=1e-6)


def test_real_lpips_matches_the_lpips_package(vgg_file: Path, real_lpips: LPIPS) -> None:
    """Same weights into the reference implementation (built on meta: no torchvision download)."""
    lpips_pkg = pytest.importorskip("lpips")
    with torch.device("meta"):
        ref = lpips_pkg.LPIPS(pretrained=False, net="vgg", pnet_rand=True, verbose=False)
    ref = ref.to_empty(device="cpu")
    vgg = load_vgg_state(vgg_file)
    state = {
        "scaling_layer.shift": torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1),
        "scaling_layer.scale": torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1),
        **load_lin_state(),
    }
    # lpips registers each head twice: as lin{k} and as lins.{k}.
    state |= {f"lins.{k[3]}{k[4:]}": v for k, v in load_lin_state().items()}
    for name, _ in ref.net.named_parameters():  # slice{k}.{N}.weight -> features.{N}.weight
        state[f"net.{name}"] = vgg["features." + name.split(".", 1)[1]]
    ref.load_state_dict(state, strict=True)
    ref.eval()
    x, y = _smooth_images(2, 64, seed=0), _smooth_images(2, 64, seed=1)
    y = y + 0.1 * _noise(tuple(y.shape), seed=2)
    with torch.no_grad():
        expected = ref(x, y).flatten()
        got = real_lpips(x, y)
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-6)


def test_broken_vgg_files_are_checkpoint_errors(tmp_path: Path) -> None:
    garbage = tmp_path / VGG_FILE
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError):
        load_vgg_state(garbage)
    with pytest.raises(CheckpointError, match="features"):
        build_lpips_vgg({"features.0.weight": torch.zeros(64, 3, 3, 3)}, load_lin_state())


# --- load_perceptual -------------------------------------------------------------------------


def test_load_perceptual_falls_back_to_the_demo(tmp_path: Path) -> None:
    a = load_perceptual(home=tmp_path)
    b = load_perceptual(home=tmp_path)
    assert a.is_demo is True and a.name == "demo-lpips"
    assert not a.training
    x, y = _smooth_images(2, 256, seed=0), _smooth_images(2, 256, seed=1)
    assert torch.equal(a(x, y), b(x, y))


def test_load_perceptual_uses_cached_vgg16(tmp_path: Path, vgg_file: Path) -> None:
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / VGG_FILE).write_bytes(vgg_file.read_bytes())
    lp = load_perceptual(home=tmp_path)
    assert lp.is_demo is False and lp.resize_to == 256
    x, y = _smooth_images(1, 64, seed=0), _smooth_images(1, 64, seed=1)
    ref = build_lpips_vgg(load_vgg_state(vgg_file), load_lin_state())
    assert torch.equal(lp(x, y), ref(x, y))


# --- identity loss ---------------------------------------------------------------------------


def test_demo_identity_separates_different_faces() -> None:
    idl = demo_identity()
    assert idl.is_demo is True
    x, y = _smooth_images(2, 256, seed=0), _smooth_images(2, 256, seed=9)
    same = idl(x, x.clone())
    diff = idl(x, y)
    assert same.shape == diff.shape == (2,)
    assert torch.allclose(same, torch.zeros(2), atol=1e-5)
    assert (diff > 1e-2).all()
    # Only the face box counts: changing the outer border does not change the loss.
    border = x.clone()
    border[..., :20, :] = 1.0
    assert torch.allclose(idl(x, border), torch.zeros(2), atol=1e-5)


def test_demo_identity_is_deterministic() -> None:
    x, y = _smooth_images(1, 128, seed=0), _smooth_images(1, 128, seed=1)
    assert torch.equal(demo_identity()(x, y), demo_identity()(x, y))


def test_load_identity_is_optional(tmp_path: Path) -> None:
    assert load_identity(home=tmp_path) is None


def test_load_identity_reads_a_facenet_state_dict(tmp_path: Path) -> None:
    state = random_facenet_state(seed=0)  # with the VGGFace2 classifier, which must be dropped
    (tmp_path / "weights").mkdir()
    # As facenet-pytorch's 2019 release file: the model's state_dict(), legacy serialisation.
    torch.save(state, tmp_path / "weights" / FACENET_FILE, _use_new_zipfile_serialization=False)

    idl = load_identity(home=tmp_path)
    assert isinstance(idl, IdentityLoss)
    assert idl.is_demo is False and idl.name == "facenet-vggface2"
    x, y = _smooth_images(2, 256, seed=0), _smooth_images(2, 256, seed=1)
    x.requires_grad_(True)
    d = idl(x, y)
    assert d.shape == (2,) and torch.isfinite(d).all()
    d.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    with torch.no_grad():
        assert torch.allclose(idl(y, y), torch.zeros(2), atol=1e-5)


def test_load_identity_rejects_a_wrong_state_dict(tmp_path: Path) -> None:
    (tmp_path / "weights").mkdir()
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "weights" / FACENET_FILE)
    with pytest.raises(CheckpointError, match="InceptionResnetV1"):
        load_identity(home=tmp_path)
