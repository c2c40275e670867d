"""Our generator renders what the official implementations render, from every file format."""

from __future__ import annotations

import argparse
import io
import json
import pickle
import pickletools
import re
import sys
import types
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from engine import stylegan2
from engine.checkpoints import (
    build_generator,
    content_hash,
    load_checkpoint,
    read_nvidia_pickle,
    save_safetensors,
)
from engine.errors import CheckpointError

TOL = 1e-4


def _ref(fixtures_dir: Path, layout: str) -> dict[str, torch.Tensor]:
    data = np.load(fixtures_dir / f"{layout}_g64_reference.npz")
    return {k: torch.from_numpy(data[k]) for k in data.files}


def _render_diff(G: torch.nn.Module, ref: dict[str, torch.Tensor], mode: str) -> float:
    with torch.no_grad():
        img = G.synthesis(ref["wplus"], noise_mode=mode)
    return float((img - ref[f"img_{mode}"]).abs().max())


def test_nvidia_layout_matches_official_render(fixtures_dir: Path) -> None:
    G = build_generator(load_checkpoint(fixtures_dir / "nvidia_g64_state.safetensors"))
    ref = _ref(fixtures_dir, "nvidia")
    assert G.num_ws == 10
    with torch.no_grad():
        assert float((G.mapping(ref["z"]) - ref["ws"]).abs().max()) <= TOL
        ws07 = G.mapping(ref["z"], truncation_psi=0.7)
        assert float((ws07 - ref["ws_trunc07"]).abs().max()) <= TOL
    assert _render_diff(G, ref, "const") <= TOL
    assert _render_diff(G, ref, "none") <= TOL
    # The two noise modes really differ, so the const comparison is not vacuous.
    assert float((ref["img_const"] - ref["img_none"]).abs().max()) > 1e-2


def test_the_gpus_eager_upsampling_matches_official_render_too(
    fixtures_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Eager on a GPU the skip images are upsampled by zero-insertion and a conv (fewer kernel
    launches), elsewhere in polyphase form: both give the official picture."""
    G = build_generator(load_checkpoint(fixtures_dir / "nvidia_g64_state.safetensors"))
    ref = _ref(fixtures_dir, "nvidia")
    monkeypatch.setattr(stylegan2, "_upsample2x", stylegan2._upsample2x_zero_insert)
    assert _render_diff(G, ref, "const") <= TOL


def test_rosinality_layout_matches_official_render(fixtures_dir: Path) -> None:
    G = build_generator(load_checkpoint(fixtures_dir / "rosinality_g64_state.safetensors"))
    ref = _ref(fixtures_dir, "rosinality")
    with torch.no_grad():
        assert float((G.mapping(ref["z"])[:, 0] - ref["w"]).abs().max()) <= TOL
    assert _render_diff(G, ref, "const") <= TOL


def test_rosinality_pt_file_loads_the_same(fixtures_dir: Path, tmp_path: Path) -> None:
    state = load_file(fixtures_dir / "rosinality_g64_state.safetensors")
    path = tmp_path / "stylegan2-test.pt"
    torch.save({"g_ema": state, "latent_avg": torch.zeros(64)}, path)
    G = build_generator(load_checkpoint(path))
    assert _render_diff(G, _ref(fixtures_dir, "rosinality"), "const") <= TOL
    assert torch.equal(G.w_avg, torch.zeros(64))


@pytest.mark.parametrize("zipfile", [True, False])
def test_a_rosinality_training_checkpoint_loads_its_g_ema(
    fixtures_dir: Path, tmp_path: Path, zipfile: bool
) -> None:
    """rosinality's train.py saves g, d, g_ema, both optimizers' states, its argparse Namespace and
    ada_aug_p in one dict (torch.save; the zip format since torch 1.6, the legacy one before)."""
    state = load_file(fixtures_dir / "rosinality_g64_state.safetensors")
    g = {k: torch.nn.Parameter(v.clone()) for k, v in state.items() if not k.startswith("noises.")}
    g_optim = torch.optim.Adam(list(g.values()), lr=0.002, betas=(0.0, 0.99))
    sum(p.square().sum() for p in g.values()).backward()
    g_optim.step()
    d = torch.nn.Conv2d(3, 8, 3)
    d_optim = torch.optim.Adam(d.parameters(), lr=0.002, betas=(0.0, 0.99))
    parser = argparse.ArgumentParser(description="StyleGAN2 trainer")
    parser.add_argument("path", type=str)
    parser.add_argument("--iter", type=int, default=800000)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--r1", type=float, default=10)
    parser.add_argument("--augment", action="store_true")
    parser.add_argument("--ckpt", type=str, default=None)
    args = parser.parse_args(["lmdb/ffhq", "--size", "64", "--augment"])
    args.latent, args.n_mlp, args.start_iter, args.distributed = 512, 8, 0, False
    g_ema = OrderedDict(state)  # Module.state_dict(): an OrderedDict carrying _metadata
    g_ema._metadata = OrderedDict((k.rsplit(".", 1)[0], {"version": 1}) for k in state)  # type: ignore[attr-defined]
    path = tmp_path / "010000.pt"
    torch.save({"g": {k: v.detach() for k, v in g.items()}, "d": d.state_dict(), "g_ema": g_ema,
                "g_optim": g_optim.state_dict(), "d_optim": d_optim.state_dict(), "args": args,
                "ada_aug_p": 0.12}, path, _use_new_zipfile_serialization=zipfile)
    G = build_generator(load_checkpoint(path))
    assert _render_diff(G, _ref(fixtures_dir, "rosinality"), "const") <= TOL


# --- An official-shape .pkl, built here the way torch_utils.persistence pickles networks. ---


def _install_fake_official_modules(monkeypatch: pytest.MonkeyPatch) -> Any:
    persistence = types.ModuleType("torch_utils.persistence")

    def _reconstruct_persistent_obj(meta: dict) -> Any:  # never called in these tests
        raise AssertionError("the loader must not call the pickle's reconstruct function")

    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    persistence._reconstruct_persistent_obj = _reconstruct_persistent_obj  # type: ignore[attr-defined]
    dnnlib_util = types.ModuleType("dnnlib.util")

    class EasyDict(dict):  # the official dnnlib.EasyDict is a dict subclass
        pass

    EasyDict.__module__ = "dnnlib.util"
    EasyDict.__qualname__ = "EasyDict"
    dnnlib_util.EasyDict = EasyDict  # type: ignore[attr-defined]
    for name, mod in [("torch_utils", types.ModuleType("torch_utils")),
                      ("torch_utils.persistence", persistence),
                      ("dnnlib", types.ModuleType("dnnlib")), ("dnnlib.util", dnnlib_util)]:
        monkeypatch.setitem(sys.modules, name, mod)

    class Persistent:
        def __init__(self, class_name: str, state: dict) -> None:
            self.class_name, self.state = class_name, state

        def __reduce__(self) -> tuple:
            meta = {"type": "class", "version": 4, "class_name": self.class_name,
                    "module_src": "import os\nos.system('echo pwned')\n", "state": self.state}
            return (_reconstruct_persistent_obj, (meta,), None)

    return Persistent, EasyDict


def _official_pkl(
    state: dict[str, torch.Tensor], init_kwargs: dict, monkeypatch: pytest.MonkeyPatch
) -> bytes:
    Persistent, EasyDict = _install_fake_official_modules(monkeypatch)
    buffers = ("w_avg", "noise_const", "resample_filter")

    def module(prefix: str, class_name: str) -> Any:
        params: OrderedDict = OrderedDict()
        bufs: OrderedDict = OrderedDict()
        children: dict[str, list[str]] = {}
        for key, value in state.items():
            if not key.startswith(prefix):
                continue
            rest = key[len(prefix):].split(".")
            if len(rest) == 1:
                target = bufs if rest[0] in buffers else params
                target[rest[0]] = value if rest[0] in buffers else torch.nn.Parameter(value)
            else:
                children.setdefault(rest[0], [])
        mods = OrderedDict((c, module(f"{prefix}{c}.", "Layer")) for c in children)
        st = {"training": False, "_parameters": params, "_buffers": bufs,
              "_non_persistent_buffers_set": set(), "_forward_hooks": OrderedDict(),
              "_modules": mods}
        return Persistent(class_name, st)

    G = module("", "Generator")
    G.state["_init_kwargs"] = EasyDict(init_kwargs)
    return pickle.dumps({"G": G, "D": module("mapping.", "Discriminator"), "G_ema": G,
                         "augment_pipe": None, "training_set_kwargs": None}, protocol=4)


def test_official_pickle_loads_through_restricted_unpickler(
    fixtures_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
) -> None:
    src = fixtures_dir / "nvidia_g64_state.safetensors"
    with safe_open(str(src), framework="pt") as f:
        kwargs = json.loads(f.metadata()["init_kwargs"])
    pkl = tmp_path / "network-snapshot.pkl"
    pkl.write_bytes(_official_pkl(load_file(src), kwargs, monkeypatch))
    # The loader works without the official modules importable.
    for name in ("torch_utils", "torch_utils.persistence", "dnnlib", "dnnlib.util"):
        monkeypatch.delitem(sys.modules, name)
    ckpt = load_checkpoint(pkl)
    assert ckpt.source_format == "nvidia-pkl"
    G = build_generator(ckpt)
    assert _render_diff(G, _ref(fixtures_dir, "nvidia"), "const") <= TOL
    assert "pwned" not in capfd.readouterr().out


# --- The pickles NVIDIA's own code wrote (../shared/fixtures/README.md). ---

OFFICIAL_PICKLES = ["nvidia_official_g64_numpy1.pkl", "nvidia_official_g64_numpy2.pkl"]


@pytest.mark.parametrize("name", OFFICIAL_PICKLES)
def test_pickles_written_by_the_official_code_load_and_render_its_picture(
    fixtures_dir: Path, name: str
) -> None:
    """numpy 1.x and 2.x spellings of the numpy scalars every official module keeps."""
    ckpt = load_checkpoint(fixtures_dir / name)
    assert ckpt.source_format == "nvidia-pkl"
    # G_ema is the generator used: the same weights as the state-dict fixture, key for key.
    expected = load_file(fixtures_dir / "nvidia_g64_state.safetensors")
    assert set(ckpt.state) == set(expected)
    G = build_generator(ckpt)
    assert _render_diff(G, _ref(fixtures_dir, "nvidia"), "const") <= TOL


def _swap_strings(data: bytes, swaps: dict[str, str]) -> bytes:
    """The same pickle with the first string op holding each key replaced (frames dropped: the
    lengths change, and protocol 4 readers accept unframed data)."""
    ops = list(pickletools.genops(data))
    out, pending = bytearray(), dict(swaps)
    for i, (op, arg, pos) in enumerate(ops):
        end = ops[i + 1][2] if i + 1 < len(ops) else len(data)
        if op.name == "FRAME":
            continue
        if op.name == "SHORT_BINUNICODE" and arg in pending:
            new = pending.pop(arg).encode()
            out += b"\x8c" + bytes([len(new)]) + new
        else:
            out += data[pos:end]
    assert not pending, f"not found in the pickle: {pending}"
    return bytes(out)


@pytest.mark.parametrize(("swaps", "message"), [
    ({"numpy.core.multiarray": "os", "scalar": "system"}, "refers to os.system"),
    ({"f8": "O8"}, "numpy value of type 'O8'"),  # an object-dtype scalar would unpickle a pointer
    ({"torch.storage": "builtins", "_load_from_bytes": "exec"}, "refers to builtins.exec"),
])
def test_an_official_pickle_with_a_swapped_global_is_refused(
    fixtures_dir: Path, tmp_path: Path, swaps: dict[str, str], message: str
) -> None:
    path = tmp_path / "ffhq.pkl"
    path.write_bytes(_swap_strings((fixtures_dir / OFFICIAL_PICKLES[0]).read_bytes(), swaps))
    with pytest.raises(CheckpointError, match=re.escape(message)):
        load_checkpoint(path)


def test_the_mutation_helper_keeps_an_unchanged_pickle_loadable(fixtures_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "ffhq.pkl"
    data = (fixtures_dir / OFFICIAL_PICKLES[0]).read_bytes()
    path.write_bytes(_swap_strings(data, {"f8": "f8"}))
    original = load_checkpoint(fixtures_dir / OFFICIAL_PICKLES[0])
    assert load_checkpoint(path).state.keys() == original.state.keys()


class _RunsCode:
    def __reduce__(self) -> tuple:
        return (print, ("code from the pickle ran",))


@pytest.mark.parametrize("payload", [
    {"G_ema": _RunsCode()},
    {"G_ema": None, "x": _RunsCode()},
])
def test_code_executing_pickle_is_refused(
    payload: dict, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(payload))
    with pytest.raises(CheckpointError, match="builtins.print"):
        load_checkpoint(path)
    assert "code from the pickle ran" not in capfd.readouterr().out


def test_os_system_pickle_is_refused_without_running(tmp_path: Path) -> None:
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self) -> tuple:
            import os
            return (os.system, (f"touch {marker}",))

    with pytest.raises(CheckpointError, match="refusing"):
        read_nvidia_pickle(pickle.dumps({"G_ema": Evil()}))
    assert not marker.exists()


def test_garbage_files_give_clear_errors(tmp_path: Path) -> None:
    for name, data in [("a.pkl", b"not a pickle"), ("b.pt", b"\x00" * 10),
                       ("c.safetensors", b"junk"), ("d.bin", b"")]:
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(CheckpointError):
            load_checkpoint(path)
    with pytest.raises(CheckpointError, match="no such"):
        load_checkpoint(tmp_path / "missing.pkl")


def test_our_safetensors_round_trip_and_content_hash(fixtures_dir: Path, tmp_path: Path) -> None:
    G = build_generator(load_checkpoint(fixtures_dir / "rosinality_g64_state.safetensors"))
    out = tmp_path / "model.safetensors"
    save_safetensors(G, out, name="test")
    G2 = build_generator(load_checkpoint(out))
    assert content_hash(G2) == content_hash(G)
    assert _render_diff(G2, _ref(fixtures_dir, "rosinality"), "const") <= TOL
    nv = build_generator(load_checkpoint(fixtures_dir / "nvidia_g64_state.safetensors"))
    assert content_hash(nv) != content_hash(G)


def test_style_space_edit_changes_only_through_styles(fixtures_dir: Path) -> None:
    G = build_generator(load_checkpoint(fixtures_dir / "nvidia_g64_state.safetensors"))
    ws = _ref(fixtures_dir, "nvidia")["wplus"]
    with torch.no_grad():
        styles = G.synthesis.styles(ws)
        assert list(styles)[:3] == ["b4.conv1", "b4.torgb", "b8.conv0"]
        base = G.synthesis.from_styles(styles)
        assert torch.allclose(base, G.synthesis(ws))
        styles["b8.conv1"] = styles["b8.conv1"] + 5.0
        assert float((G.synthesis.from_styles(styles) - base).abs().max()) > 1e-3
    with pytest.raises(ValueError, match="ws must be"):
        G.synthesis.styles(ws[:, :5])


def test_io_stream_is_accepted(fixtures_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = fixtures_dir / "nvidia_g64_state.safetensors"
    data = _official_pkl(load_file(src), {}, monkeypatch)
    state, kwargs = read_nvidia_pickle(io.BytesIO(data))
    assert "mapping.w_avg" in state and kwargs == {}


def test_small_and_large_batches_render_the_same(fixtures_dir: Path) -> None:
    """Up to 8 images run the fused (per-sample weights) modulated conv, more scale activations
    around one shared conv with the upsampling filter folded into its weights: the same pictures
    either way."""
    G = build_generator(load_checkpoint(fixtures_dir / "nvidia_g64_state.safetensors"))
    with torch.no_grad():
        ws = G.mapping(torch.randn(12, G.cfg.z_dim, generator=torch.Generator().manual_seed(5)))
        together = G.synthesis(ws)
        in_fours = torch.cat([G.synthesis(ws[i:i + 4]) for i in range(0, 12, 4)])
    assert float((together - in_fours).abs().max()) < 1e-4


def test_optimising_moves_latents_as_the_fused_conv_would(
    fixtures_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While optimising, the modulated conv always scales activations (no per-sample weight
    gradients); the fused form renders. An inversion step must move each latent the same way
    through either."""
    G = build_generator(load_checkpoint(fixtures_dir / "nvidia_g64_state.safetensors"))
    with torch.no_grad():
        ws = G.mapping(torch.randn(8, G.cfg.z_dim, generator=torch.Generator().manual_seed(6)))
    target = torch.randn(8, 3, G.resolution, G.resolution, generator=torch.Generator().manual_seed(7))

    def grads() -> torch.Tensor:
        batch = ws.clone().requires_grad_(True)
        (G.synthesis(batch) - target).square().sum().backward()
        assert batch.grad is not None
        return batch.grad

    unfused = grads()
    monkeypatch.setattr(stylegan2, "_FUSED_MAX_BATCH_GRAD", 8)
    fused = grads()
    # Per latent layer, relative to its largest gradient. In float32 the unfused style gradients of
    # the coarse layers are off by up to ~0.4% (their demodulation term nearly cancels the direct
    # one; in float64 the two paths agree to 1e-15): far below what moves an inversion.
    scale = fused.abs().amax(dim=(0, 2))
    assert bool((scale > 0).all())
    assert float(((unfused - fused).abs().amax(dim=(0, 2)) / scale).max()) < 1e-2
