"""The `stylebot` CLI end to end, as a user runs it: real processes, real files, demo model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data

STYLEBOT = Path(sys.executable).with_name("stylebot")


def _run(*args: str, ok: bool = True, env: dict[str, str] | None = None
         ) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    proc = subprocess.run([str(STYLEBOT), *args], capture_output=True, text=True, env=full_env,
                          timeout=300)
    if ok:
        assert proc.returncode == 0, proc.stderr
    return proc


def _size(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:
        return im.size


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.int16)


@pytest.fixture(scope="module")
def astronaut_jpg(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("photos") / "astronaut.jpg"
    Image.fromarray(data.astronaut()).save(path, quality=95)
    return path


@pytest.fixture(scope="module")
def inverted(astronaut_jpg: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("inv") / "astronaut_jpg"
    _run("invert", str(astronaut_jpg), "-o", str(out), "--model", "demo", "--device", "cpu",
         "--steps", "40")
    return out


def test_invert_writes_the_four_files(inverted: Path) -> None:
    latent = np.load(inverted / "latent.npy")
    assert latent.shape == (10, 512) and latent.dtype == np.float32
    assert _size(inverted / "aligned.png") == (64, 64)
    assert _size(inverted / "reconstruction.png") == (64, 64)
    report = json.loads((inverted / "report.json").read_text())
    assert report["steps"] == 40 and report["psnr"] > 10 and report["seconds"] > 0
    assert report["model_id"].startswith("sg2-") and "not a face model" in report["model"]
    assert "lpips" in report
    alignment = json.loads((inverted / "alignment.json").read_text())
    assert alignment["size"] == 64 and alignment["faces_found"] == 1


def test_render_reproduces_the_reconstruction(inverted: Path, tmp_path: Path) -> None:
    out = tmp_path / "render.png"
    _run("render", str(inverted / "latent.npy"), "-o", str(out), "--model", "demo")
    a, b = _pixels(out), _pixels(inverted / "reconstruction.png")
    assert np.abs(a - b).max() <= 1


def test_morph_and_gif(inverted: Path, tmp_path: Path) -> None:
    import torch

    from engine.latents import save_latent  # a second person: another latent of the same model

    stamp = json.loads((inverted / "latent.json").read_text())
    other = tmp_path / "friend.npy"
    save_latent(other, torch.randn(10, 512), model_id=stamp["model_id"])
    mp4 = tmp_path / "morph.mp4"
    _run("morph", str(inverted / "latent.npy"), str(other), "-o", str(mp4), "--model", "demo",
         "--frames", "12", "--layers", "coarse")
    from engine.video import probe

    info = probe(mp4)
    assert (info.frames, info.width, info.height, info.codec) == (12, 64, 64, "h264")
    gif = tmp_path / "morph.gif"
    _run("morph", str(inverted / "latent.npy"), str(other), "-o", str(gif), "--model", "demo",
         "--frames", "6", "--pingpong")
    with Image.open(gif) as im:
        assert im.n_frames == 10


def test_user_mistakes_are_one_line_errors(inverted: Path, tmp_path: Path) -> None:
    text = tmp_path / "notes.jpg"
    text.write_text("this is not a photo")
    cases = [
        (["invert", str(tmp_path / "missing.jpg"), "-o", str(tmp_path / "x"), "--model", "demo"],
         "missing.jpg"),
        (["invert", str(text), "-o", str(tmp_path / "x"), "--model", "demo"], "image"),
        (["render", str(inverted / "latent.npy"), "-o", str(tmp_path / "r.png"),
          "--model", str(tmp_path / "nope.pkl")], "unknown model"),
        (["morph", str(inverted / "latent.npy"), str(inverted / "latent.npy"),
          "-o", str(tmp_path / "m.avi"), "--model", "demo"], ".mp4 or .gif"),
        (["render", str(inverted / "latent.npy"), "-o", str(tmp_path / "no" / "r.png"),
          "--model", "demo"], "does not exist"),
    ]
    for args, needle in cases:
        proc = _run(*args, ok=False)
        assert proc.returncode == 2, (args, proc.stderr)
        assert "Traceback" not in proc.stderr
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith("stylebot: error:") and needle in last, last


def test_latent_from_another_model_is_refused(inverted: Path, tmp_path: Path,
                                              fixtures_dir: Path) -> None:
    proc = _run("render", str(inverted / "latent.npy"), "-o", str(tmp_path / "r.png"),
                "--model", str(fixtures_dir / "nvidia_g64_state.safetensors"), ok=False)
    assert proc.returncode == 2
    assert "needs [10, 64]" in proc.stderr or "made by model" in proc.stderr


def test_weights_list_and_convert(tmp_path: Path, fixtures_dir: Path) -> None:
    listing = _run("weights", "list").stdout
    for name in ("stylegan2-ffhq-1024", "clip-vit-b32", "vgg16-imagenet", "facenet-vggface2"):
        assert name in listing
    out = tmp_path / "g.safetensors"
    _run("weights", "convert", str(fixtures_dir / "rosinality_g64_state.safetensors"),
         "-o", str(out))
    png = tmp_path / "z.png"
    lat = tmp_path / "w.npy"
    np.save(lat, np.zeros((10, 64), np.float32))
    _run("render", str(lat), "-o", str(png), "--model", str(out))
    assert _size(png) == (64, 64)


def test_help_does_not_import_torch() -> None:
    code = "import sys, cli; cli.build_parser(); print('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "False"


def test_edit_global_pasted_into_the_photo(inverted: Path, astronaut_jpg: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    env_home = {"STYLEBOT_HOME": str(home)}
    out = tmp_path / "smile.png"
    proc = _run("edit", str(inverted / "latent.npy"), "smiling face", "-o", str(out),
                "--model", "demo", "--clip", "demo", "--samples", "1", "--beta", "0.05",
                "--paste-into", str(astronaut_jpg), env=env_home)
    assert "built the channel table" in proc.stderr
    assert _size(out) == (512, 512)  # the photo's own size
    assert _size(tmp_path / "smile-face.png") == (64, 64)
    photo = np.asarray(Image.open(astronaut_jpg).convert("RGB"), dtype=np.int16)
    changed = np.abs(_pixels(out) - photo).max(axis=2) > 0
    from engine.align import Alignment
    from engine.pasteback import paste_mask

    mask = paste_mask(Alignment.from_json(json.loads((inverted / "alignment.json").read_text())))
    assert changed.any() and not changed[mask == 0].any()
    assert changed[mask > 0.5].mean() > 0.5
    # The table is cached: a second edit builds nothing.
    proc = _run("edit", str(inverted / "latent.npy"), "smiling face", "-o", str(out),
                "--model", "demo", "--clip", "demo", "--beta", "0.05", "--strength", "-2",
                env=env_home)
    assert "built" not in proc.stderr
    listed = _run("directions", "list", env=env_home).stdout
    assert ".safetensors" in listed


def test_edit_optimize(inverted: Path, tmp_path: Path) -> None:
    out = tmp_path / "beard.png"
    _run("edit", str(inverted / "latent.npy"), "a face with a beard", "-o", str(out),
         "--method", "optimize", "--steps", "5", "--model", "demo", "--clip", "demo")
    assert _size(out) == (64, 64)


def test_edit_mistakes(inverted: Path, tmp_path: Path, astronaut_jpg: Path) -> None:
    lat = str(inverted / "latent.npy")
    for args, needle in [
        (["edit", lat, "   ", "-o", str(tmp_path / "e.png")], "say what the edit"),
        (["edit", lat, "smile", "-o", str(tmp_path / "e.png"), "--method", "optimize",
          "--strength", "0"], "positive"),
        (["edit", lat, "smile", "-o", str(tmp_path / "e.png"), "--paste-into",
          str(tmp_path / "gone.jpg")], "gone.jpg"),
    ]:
        proc = _run(*args, "--model", "demo", "--clip", "demo", ok=False)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        assert needle in proc.stderr.strip().splitlines()[-1], proc.stderr
