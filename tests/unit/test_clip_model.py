"""CLIP loading (safe TorchScript reader, clip-anytorch's own loader) and the encoders StyleCLIP uses."""

from __future__ import annotations

import collections
import os
import pickle
import warnings
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import skimage.data
import torch
import torch.nn.functional as F

from bench.stand_ins import save_clip_torchscript
from engine import weights

# clip comes from engine.clip_model, which imports it with the pkg_resources deprecation warning
# silenced: importing clip here first would raise that warning (warnings are errors in tests).
from engine.clip_model import (
    DEMO_CLIP_NAME,
    ClipModel,
    build_demo_clip,
    clip,
    demo_clip_state_dict,
    is_torchscript_archive,
    load_clip,
    read_torchscript_state_dict,
)
from engine.errors import CheckpointError, EngineError, WeightsMissingError


@pytest.fixture(scope="module")
def demo() -> ClipModel:
    return build_demo_clip()


def _photo(array: np.ndarray, size: int) -> torch.Tensor:
    """[1, 3, size, size] in [-1, 1]: the centre square of an RGB uint8 photo, area-resized."""
    x = torch.from_numpy(array).permute(2, 0, 1)[None].float() / 127.5 - 1.0  # [1, 3, H, W]
    h, w = x.shape[-2:]
    s = min(h, w)
    x = x[:, :, (h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
    return F.interpolate(x, size=(size, size), mode="area")


def _same_embeddings(a: ClipModel, b: ClipModel, *, atol: float = 1e-5) -> None:
    images = torch.cat([_photo(skimage.data.astronaut(), 64), _photo(skimage.data.chelsea(), 64)])
    texts = ["a photo of a smiling face", "a cat"]
    torch.testing.assert_close(a.encode_images(images), b.encode_images(images), atol=atol, rtol=0)
    torch.testing.assert_close(a.encode_text(texts), b.encode_text(texts), atol=atol, rtol=0)


@pytest.fixture(scope="module")
def torchscript_files(demo: ClipModel, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The demo CLIP as TorchScript archives: {"float32": path, "float16": path}."""
    folder = tmp_path_factory.mktemp("ts")
    files = {"float32": folder / "tiny-clip-ts.pt", "float16": folder / "tiny-clip-ts-half.pt"}
    for dtype, path in files.items():
        save_clip_torchscript(demo.model, path, input_resolution=64, half=dtype == "float16")
    return files


def _forbid_code_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("TorchScript must not be loaded with torch.jit.load")

    monkeypatch.setattr(torch.jit, "load", refuse)
    monkeypatch.setattr(torch._C, "import_ir_module", refuse)
    monkeypatch.setattr(torch._C, "import_ir_module_from_buffer", refuse)


# ---------------------------------------------------------------------------------------------
# Loading


def test_a_state_dict_file_loads_through_clip_load_and_load_clip(demo: ClipModel, tmp_path: Path) -> None:
    path = tmp_path / "tiny-clip.pt"
    torch.save(demo_clip_state_dict(), path)
    assert not is_torchscript_archive(path)

    # clip-anytorch's own loader: torch.jit.load fails on a plain zip, then torch.load + build_model
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"`torch\.jit\.load` is deprecated", FutureWarning)
        net, _ = clip.load(str(path), device="cpu", jit=False)
    via_clip = ClipModel(model=net, name="clip.load", is_demo=False, model_key="-")
    ours = load_clip(str(path))

    assert not ours.is_demo and ours.name == "tiny-clip.pt"
    assert ours.model_key == demo.model_key  # same weights -> same cache key
    assert via_clip.input_resolution == ours.input_resolution == 64
    _same_embeddings(via_clip, demo)
    _same_embeddings(ours, demo)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_a_torchscript_archive_is_read_without_running_it(
    demo: ClipModel, torchscript_files: dict[str, Path], monkeypatch: pytest.MonkeyPatch, dtype: str
) -> None:
    path, half = torchscript_files[dtype], dtype == "float16"
    _forbid_code_loading(monkeypatch)

    assert is_torchscript_archive(path)
    state = read_torchscript_state_dict(path)
    expected = demo.model.state_dict()
    assert set(expected) <= set(state)
    assert set(state) - set(expected) == {"input_resolution", "context_length", "vocab_size"}
    assert int(state["vocab_size"]) == 49408
    for key, value in expected.items():
        if half:
            torch.testing.assert_close(state[key].float(), value, atol=1e-2, rtol=1e-3)
        else:
            assert torch.equal(state[key], value), key
    assert state["visual.conv1.weight"].dtype == (torch.float16 if half else torch.float32)

    loaded = load_clip(path)
    assert not loaded.is_demo
    if half:  # OpenAI's layout: float16 weights, close to the float32 original
        assert loaded.model.positional_embedding.dtype == torch.float32
        _same_embeddings(loaded, demo, atol=2e-2)
    else:
        assert loaded.model_key == demo.model_key
        _same_embeddings(loaded, demo)


def test_auto_uses_the_real_clip_file_when_it_is_in_the_cache(
    demo: ClipModel, torchscript_files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = weights.asset_path("clip-vit-b32", home=tmp_path)
    target.parent.mkdir(parents=True)
    target.write_bytes(torchscript_files["float32"].read_bytes())  # standing in for ViT-B-32.pt
    _forbid_code_loading(monkeypatch)

    loaded = load_clip("auto", home=tmp_path)
    assert (loaded.name, loaded.is_demo) == ("clip-vit-b32", False)
    _same_embeddings(loaded, demo)


def test_auto_without_weights_is_the_demo() -> None:
    loaded = load_clip("auto")  # conftest points STYLEBOT_HOME at an empty folder
    assert loaded.is_demo and loaded.name == DEMO_CLIP_NAME


def test_the_real_clip_missing_says_which_file_to_fetch() -> None:
    with pytest.raises(WeightsMissingError) as err:
        load_clip("clip-vit-b32")
    assert "ViT-B-32.pt" in err.value.message
    assert "stylebot weights fetch clip-vit-b32" in err.value.message


@pytest.mark.parametrize("name", ["no-such-file.pt", "stylegan2-ffhq-1024"])
def test_unknown_names_are_clear_errors(name: str) -> None:
    with pytest.raises(EngineError) as err:
        load_clip(name)
    assert name in err.value.message and "\n" not in err.value.message


def test_a_file_that_is_not_clip_is_a_checkpoint_error(tmp_path: Path) -> None:
    path = tmp_path / "other.pt"
    torch.save({"conv.weight": torch.zeros(4, 3, 3, 3)}, path)
    with pytest.raises(CheckpointError, match="not a CLIP model"):
        load_clip(path)


# ---------------------------------------------------------------------------------------------
# Malicious files: refused, and their code never runs


class _Call:
    """Pickles as a call of ``func(*args)``: what a malicious weights file does."""

    def __init__(self, func: Callable[..., Any], *args: Any) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple[Any, ...]:
        return self.func, self.args


def _module_pickle(attribute_value: bytes) -> bytes:
    """data.pkl of a TorchScript module object whose one attribute ``weight`` is the given pickle."""
    body = attribute_value[2:-1]  # drop PROTO 2 and STOP
    return b"\x80\x02c__torch__.evil\nModule\n)\x81}X\x06\x00\x00\x00weight" + body + b"sb."


def _write_archive(path: Path, data_pkl: bytes, records: Mapping[str, bytes] | None = None) -> Path:
    """A zip laid out like a TorchScript archive (data.pkl, constants.pkl, code/, data/)."""
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("evil/version", b"3\n")
        zf.writestr("evil/data.pkl", data_pkl)
        zf.writestr("evil/constants.pkl", pickle.dumps((), protocol=2))
        zf.writestr("evil/code/__torch__/evil.py", b"class Module(Module):\n  pass\n")
        for key, value in (records or {}).items():
            zf.writestr(f"evil/data/{key}", value)
    return path


def _payloads(marker: Path) -> dict[str, bytes]:
    run_os = pickle.dumps(_Call(os.system, f"touch {marker}"), protocol=2, fix_imports=False)
    run_eval = pickle.dumps(_Call(eval, f"open({str(marker)!r}, 'w').close()"), protocol=2,
                            fix_imports=False)
    return {
        "os.system at the top": run_os,
        "builtins.eval at the top": run_eval,
        "os.system inside a module": _module_pickle(run_os),
        "builtins.eval inside a module": _module_pickle(run_eval),
    }


@pytest.mark.parametrize("case", list(_payloads(Path("x"))))
def test_a_torchscript_archive_calling_code_is_refused(
    case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = tmp_path / "pwned"
    path = _write_archive(tmp_path / "evil.pt", _payloads(marker)[case])
    _forbid_code_loading(monkeypatch)
    assert is_torchscript_archive(path)

    with pytest.raises(CheckpointError) as err:
        read_torchscript_state_dict(path)
    assert ("posix.system" if "os.system" in case else "builtins.eval") in err.value.message
    assert "\n" not in err.value.message
    with pytest.raises(CheckpointError):
        load_clip(path)
    assert not marker.exists()


def test_a_plain_checkpoint_calling_code_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil-state.pt"
    torch.save({"visual.proj": torch.zeros(2, 2), "x": _Call(os.system, f"touch {marker}")}, path)
    with pytest.raises(CheckpointError, match="could run code"):
        load_clip(path)
    assert not marker.exists()


class _Storage:
    """Pickled as a persistent storage reference, like torch's pickler writes."""


class _TensorPickler(pickle.Pickler):
    def __init__(self, file: Any, storage: _Storage, numel: int) -> None:
        super().__init__(file, protocol=2)
        self.storage, self.numel = storage, numel

    def persistent_id(self, obj: Any) -> Any:
        if obj is self.storage:
            return ("storage", torch.FloatStorage, "0", "cpu", self.numel)
        return None


def _tensor_archive(path: Path, *, size: tuple[int, ...], numel: int = 4, stored: int = 4) -> Path:
    """An archive with one tensor ``weight`` of ``size`` over a storage said to hold ``numel``
    floats, whose data record holds ``stored`` floats."""
    import io

    storage = _Storage()
    rebuild = _Call(torch._utils._rebuild_tensor_v2, storage, 0, size, (1,) * len(size), False,
                    collections.OrderedDict())
    buf = io.BytesIO()
    _TensorPickler(buf, storage, numel).dump(rebuild)
    values = torch.arange(stored, dtype=torch.float32)
    return _write_archive(path, _module_pickle(buf.getvalue()), {"0": values.numpy().tobytes()})


def test_hand_built_tensor_records_are_read_and_bounds_checked(tmp_path: Path) -> None:
    ok = _tensor_archive(tmp_path / "ok.pt", size=(4,))
    assert torch.equal(read_torchscript_state_dict(ok)["weight"], torch.arange(4.0))

    past_the_end = _tensor_archive(tmp_path / "oob.pt", size=(1000,))
    with pytest.raises(CheckpointError, match="past the end"):
        read_torchscript_state_dict(past_the_end)

    short_record = _tensor_archive(tmp_path / "short.pt", size=(8,), numel=8, stored=4)
    with pytest.raises(CheckpointError, match="holds 16 bytes, its tensor needs 32"):
        read_torchscript_state_dict(short_record)


def test_files_that_are_not_torchscript_are_told_apart(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("not a model")
    assert not is_torchscript_archive(text)
    assert not is_torchscript_archive(tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match="not a TorchScript archive"):
        read_torchscript_state_dict(text)


# ---------------------------------------------------------------------------------------------
# Encoders


def test_demo_is_deterministic_and_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = build_demo_clip()
    assert torch.equal(torch.rand(3), expected)

    assert build_demo_clip().model_key == a.model_key
    assert build_demo_clip(seed=1).model_key != a.model_key
    assert a.is_demo and a.name == DEMO_CLIP_NAME


def test_image_embeddings_are_unit_and_differentiable(demo: ClipModel) -> None:
    images = torch.cat([_photo(skimage.data.astronaut(), 128), _photo(skimage.data.coffee(), 128)])
    images.requires_grad_(True)
    emb = demo.encode_images(images)
    assert emb.shape == (2, demo.embed_dim) and emb.dtype == torch.float32
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(2))

    (emb @ demo.text_embedding("a smiling face")).sum().backward()
    assert images.grad is not None and torch.isfinite(images.grad).all()
    assert images.grad.abs().amax(dim=(1, 2, 3)).min() > 0  # every image gets a gradient


def test_non_square_images_are_center_cropped(demo: ClipModel) -> None:
    image = torch.rand(1, 3, 64, 80, requires_grad=True) * 2 - 1  # [1, 3, H=64, W=80]
    image.retain_grad()
    demo.encode_images(image)[0, :8].sum().backward()
    assert image.grad is not None
    assert image.grad[..., :8].abs().max() == 0 and image.grad[..., 72:].abs().max() == 0
    assert image.grad[..., 8:72].abs().max() > 0
    torch.testing.assert_close(demo.encode_images(image), demo.encode_images(image[..., 8:72]))


def test_image_size_does_not_change_the_embedding(demo: ClipModel) -> None:
    big = _photo(skimage.data.astronaut(), 128)
    small = F.interpolate(big, size=(64, 64), mode="area")
    other = _photo(skimage.data.chelsea(), 128)
    e_big, e_other = demo.encode_images(torch.cat([big, other]))
    e_small = demo.encode_images(small)[0]
    assert float(e_big @ e_small) > 0.999
    assert float(e_big @ e_other) < 0.95  # the check above can fail: other photos land elsewhere


def test_text_embeddings_and_directions(demo: ClipModel) -> None:
    smile, face = demo.text_embedding("smiling face"), demo.text_embedding("face")
    assert smile.shape == (demo.embed_dim,)
    torch.testing.assert_close(smile.norm(), torch.tensor(1.0))
    assert float(smile @ face) < 0.999

    forward = demo.text_direction("smiling face", "face")
    backward = demo.text_direction("face", "smiling face")
    torch.testing.assert_close(forward.norm(), torch.tensor(1.0))
    torch.testing.assert_close(forward, -backward)
    with pytest.raises(EngineError, match="same"):
        demo.text_direction("face", "face")


def test_long_and_emoji_texts_encode(demo: ClipModel) -> None:
    long_text = "smile " * 334  # 2,004 characters: far past CLIP's 77 tokens
    longer = "smile " * 800
    emb = demo.encode_text([long_text, longer, "😀🎉 a smiling face 👍", ""])
    assert emb.shape == (4, demo.embed_dim) and torch.isfinite(emb).all()
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(emb[0], emb[1])  # both truncated to the same 77 tokens
    assert emb.requires_grad is False
    with pytest.raises(TypeError):
        demo.encode_text("a single string")
