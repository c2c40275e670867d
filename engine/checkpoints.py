"""Read StyleGAN2 checkpoints without executing code from them, and write our own format.

Supported inputs:

* NVIDIA stylegan2-ada-pytorch / stylegan3 ``.pkl`` (StyleGAN2 architecture): a pickle whose
  networks are "persistent classes" rebuilt by ``torch_utils.persistence._reconstruct_persistent_obj``
  from a ``meta`` dict that carries the class source code. We never run that code: a restricted
  unpickler maps the few globals a weights pickle needs to safe stand-ins and refuses the rest.
  The whole training snapshot is read (``G``, ``D``, ``G_ema``, ...) and ``G_ema`` is used; the
  numpy float scalars the official modules keep are rebuilt from their bytes (numeric only).
* rosinality ``.pt`` (``g_ema`` state dict), read with ``torch.load(weights_only=True)``.
* ``.safetensors``: ours (config JSON in the metadata, NVIDIA parameter names), or a plain
  NVIDIA- or rosinality-layout state dict.

Everything is converted to NVIDIA parameter names (what :mod:`engine.stylegan2` uses).
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import io
import json
import math
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from engine.errors import CheckpointError, WeightsMissingError
from engine.stylegan2 import Generator, GeneratorConfig

__all__ = [
    "Checkpoint",
    "build_generator",
    "content_hash",
    "load_checkpoint",
    "load_tensor_file",
    "read_nvidia_pickle",
    "read_safetensors",
    "save_safetensors",
]

_FORMAT_KEY = "stylebot_format"
_FORMAT = "stylegan2-v1"
_W_AVG_SAMPLES = 10_000


@dataclass
class Checkpoint:
    """A generator's architecture and weights in NVIDIA parameter names."""

    config: GeneratorConfig
    state: dict[str, torch.Tensor]
    source_format: str  # "nvidia-pkl" | "rosinality-pt" | "safetensors" (+ layout)


# ---------------------------------------------------------------------------------------------
# The restricted unpickler for NVIDIA .pkl files.


class _PersistentObject:
    """Stand-in for a persistent-class instance: only its class name and __dict__ are kept."""

    def __init__(self, meta: Mapping[str, Any]) -> None:
        if not isinstance(meta, Mapping) or meta.get("type") != "class":
            raise CheckpointError("this .pkl has a persistent object of an unknown shape")
        self.class_name = str(meta.get("class_name", ""))
        state = meta.get("state") or {}
        self.state: dict[str, Any] = dict(state) if isinstance(state, Mapping) else {}
        # meta["module_src"] is the class's source code. It is deliberately ignored.


class _EasyDict(dict[str, Any]):
    """Stand-in for dnnlib.EasyDict (a dict with attribute access): data only."""


# numpy scalars the official modules keep in their __dict__ (``act_gain = np.sqrt(2)``) are pickled
# as numpy.dtype(code, align, copy) + BUILD(state) and multiarray.scalar(dtype, raw bytes).
_NUMERIC_DTYPE = re.compile(r"(b1|[iu][1248]|f[248]|c(8|16))")


class _NumpyDtype:
    """Stand-in for ``numpy.dtype`` as pickled: numeric kinds only (no object or record dtypes)."""

    def __init__(self, code: Any, align: Any = False, copy: Any = True) -> None:
        if not isinstance(code, str) or not _NUMERIC_DTYPE.fullmatch(code):
            raise CheckpointError(f"refusing to load this .pkl: it holds a numpy value of type "
                                  f"{str(code)[:20]!r}, which a weights file does not need")
        self.code, self.byteorder = code, "="

    def __setstate__(self, state: Any) -> None:
        # (version, byteorder, subarray, names, fields, elsize, alignment, flags): a plain numeric
        # dtype has no subarray, names or fields.
        if (not isinstance(state, tuple) or len(state) < 5 or state[1] not in ("<", ">", "|", "=")
                or any(part is not None for part in state[2:5])):
            raise CheckpointError("refusing to load this .pkl: it holds a malformed numpy dtype")
        self.byteorder = state[1]

    def to_numpy(self) -> np.dtype:
        return np.dtype(("" if self.byteorder in "|=" else self.byteorder) + self.code)


def _numpy_scalar(dtype: Any, data: Any = None) -> Any:
    """Safe ``numpy.core.multiarray.scalar``: one number read from its raw bytes."""
    if not isinstance(dtype, _NumpyDtype) or not isinstance(data, bytes):
        raise CheckpointError("refusing to load this .pkl: it holds a numpy scalar that is not a number")
    values = np.frombuffer(data, dtype=dtype.to_numpy())
    if values.size != 1:
        raise CheckpointError("this .pkl holds a malformed numpy scalar")
    return values[0]


def _load_storage_bytes(data: bytes) -> Any:
    # torch pickles a storage as the bytes of a legacy torch.save; read them weights-only.
    return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")


def _torch_dtypes() -> dict[str, Any]:
    return {name: getattr(torch, name) for name in (
        "float16", "float32", "float64", "bfloat16", "int8", "int16", "int32", "int64", "uint8",
        "bool",
    )}


_SAFE_GLOBALS: dict[tuple[str, str], Any] = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _PersistentObject,
    ("dnnlib.util", "EasyDict"): _EasyDict,
    ("dnnlib", "EasyDict"): _EasyDict,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): _load_storage_bytes,
    ("numpy", "dtype"): _NumpyDtype,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,  # written by numpy 1.x (NVIDIA's pickles)
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,  # written by numpy 2.x
    **{("torch", name): value for name, value in _torch_dtypes().items()},
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return _SAFE_GLOBALS[(module, name)]
        except KeyError:
            raise CheckpointError(
                f"refusing to load this .pkl: it refers to {module}.{name}, which a weights "
                "file does not need (loading it could run code)"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise CheckpointError("refusing to load this .pkl: unexpected persistent reference")


def _collect_state(obj: _PersistentObject, prefix: str, out: dict[str, torch.Tensor]) -> None:
    for group in ("_parameters", "_buffers"):
        for key, value in (obj.state.get(group) or {}).items():
            if value is not None:
                if not isinstance(value, torch.Tensor):
                    raise CheckpointError(f"{prefix}{key} in this .pkl is not a tensor")
                out[prefix + key] = value.detach()
    for key, child in (obj.state.get("_modules") or {}).items():
        if child is None:
            continue
        if not isinstance(child, _PersistentObject):
            raise CheckpointError(f"{prefix}{key} in this .pkl is not a network module")
        _collect_state(child, f"{prefix}{key}.", out)


def read_nvidia_pickle(data: bytes | io.BytesIO) -> tuple[dict[str, torch.Tensor], dict]:
    """Return (G_ema state dict, G_ema init kwargs) from an official NVIDIA .pkl, safely."""
    stream = io.BytesIO(data) if isinstance(data, bytes) else data
    try:
        top = _RestrictedUnpickler(stream).load()
    except CheckpointError:
        raise
    except Exception as exc:  # malformed pickle: one clear line, not a traceback
        raise CheckpointError(f"this .pkl could not be read: {exc}") from None
    if not isinstance(top, Mapping) or not isinstance(top.get("G_ema"), _PersistentObject):
        raise CheckpointError("this .pkl has no 'G_ema' generator (not a StyleGAN2 .pkl?)")
    g_ema: _PersistentObject = top["G_ema"]
    state: dict[str, torch.Tensor] = {}
    _collect_state(g_ema, "", state)
    kwargs = g_ema.state.get("_init_kwargs") or g_ema.state.get("init_kwargs") or {}
    return state, dict(kwargs)


# ---------------------------------------------------------------------------------------------
# Layout conversions.


def _nvidia_config(
    state: Mapping[str, torch.Tensor], init_kwargs: Mapping[str, Any]
) -> GeneratorConfig:
    if "mapping.embed.weight" in state or int(init_kwargs.get("c_dim", 0) or 0) > 0:
        raise CheckpointError("class-conditional generators are not supported")
    if any(k.startswith("synthesis.input.") for k in state):
        raise CheckpointError(
            "this is a StyleGAN3 (alias-free) generator; only the StyleGAN2 architecture is supported"
        )
    syn = dict(init_kwargs.get("synthesis_kwargs") or {})
    mapping = dict(init_kwargs.get("mapping_kwargs") or {})
    if syn.get("architecture", "skip") != "skip":
        raise CheckpointError(f"synthesis architecture {syn['architecture']!r} is not supported")
    fc = sorted(int(m.group(1)) for k in state if (m := re.fullmatch(r"mapping\.fc(\d+)\.weight", k)))
    block_re = r"synthesis\.b(\d+)\.conv1\.weight"
    blocks = sorted(int(m.group(1)) for k in state if (m := re.fullmatch(block_re, k)))
    if not fc or not blocks:
        raise CheckpointError("this file holds no StyleGAN2 generator (no mapping/synthesis)")
    channels = {r: int(state[f"synthesis.b{r}.conv1.weight"].shape[0]) for r in blocks}
    clamp = syn.get("conv_clamp")
    return GeneratorConfig(
        z_dim=int(state["mapping.fc0.weight"].shape[1]),
        w_dim=int(state[f"mapping.fc{fc[-1]}.weight"].shape[0]),
        resolution=blocks[-1],
        channels=channels,
        mapping_layers=len(fc),
        mapping_lr_mul=float(mapping.get("lr_multiplier", 0.01)),
        conv_clamp=None if clamp is None else float(clamp),
        img_channels=int(state[f"synthesis.b{blocks[-1]}.torgb.weight"].shape[0]),
    )


def _rosinality_to_nvidia(state: Mapping[str, torch.Tensor]) -> tuple[GeneratorConfig, dict]:
    out: dict[str, torch.Tensor] = {}
    n_mlp = sum(1 for k in state if re.fullmatch(r"style\.\d+\.weight", k))
    for i in range(n_mlp):
        out[f"mapping.fc{i}.weight"] = state[f"style.{i + 1}.weight"]
        out[f"mapping.fc{i}.bias"] = state[f"style.{i + 1}.bias"]
    out["synthesis.b4.const"] = state["input.input"][0]
    num_convs = sum(1 for k in state if re.fullmatch(r"convs\.\d+\.conv\.weight", k))
    resolution = 4 * 2 ** (num_convs // 2)

    def conv(src: str, dst: str, noise_idx: int) -> None:
        weight = state[f"{src}.conv.weight"][0]  # [O, I, k, k]
        fan_in = weight.shape[1] * weight.shape[2] * weight.shape[3]
        out[f"{dst}.weight"] = weight / math.sqrt(fan_in)  # rosinality scales at run time
        out[f"{dst}.affine.weight"] = state[f"{src}.conv.modulation.weight"]
        out[f"{dst}.affine.bias"] = state[f"{src}.conv.modulation.bias"]
        out[f"{dst}.bias"] = state[f"{src}.activate.bias"]
        out[f"{dst}.noise_strength"] = state[f"{src}.noise.weight"].reshape([])
        noise = state.get(f"noises.noise_{noise_idx}")
        res = int(dst.split(".")[1][1:])
        out[f"{dst}.noise_const"] = (
            noise.reshape(res, res) if noise is not None else torch.zeros(res, res)
        )

    def torgb(src: str, dst: str) -> None:
        out[f"{dst}.weight"] = state[f"{src}.conv.weight"][0]
        out[f"{dst}.affine.weight"] = state[f"{src}.conv.modulation.weight"]
        out[f"{dst}.affine.bias"] = state[f"{src}.conv.modulation.bias"]
        out[f"{dst}.bias"] = state[f"{src}.bias"].reshape(-1)

    conv("conv1", "synthesis.b4.conv1", 0)
    torgb("to_rgb1", "synthesis.b4.torgb")
    for k in range(num_convs // 2):
        res = 8 * 2**k
        conv(f"convs.{2 * k}", f"synthesis.b{res}.conv0", 2 * k + 1)
        conv(f"convs.{2 * k + 1}", f"synthesis.b{res}.conv1", 2 * k + 2)
        torgb(f"to_rgbs.{k}", f"synthesis.b{res}.torgb")
    if "latent_avg" in state:
        out["mapping.w_avg"] = state["latent_avg"].reshape(-1)
    cfg = _nvidia_config(out, {})
    if cfg.resolution != resolution:
        raise CheckpointError("this rosinality checkpoint has an inconsistent layer count")
    return cfg, out


def _from_state(state: Mapping[str, torch.Tensor], meta: Mapping[str, str], fmt: str) -> Checkpoint:
    if meta.get(_FORMAT_KEY) == _FORMAT:
        return Checkpoint(GeneratorConfig.from_json(meta["config"]), dict(state), fmt)
    if "style.1.weight" in state:
        cfg, out = _rosinality_to_nvidia(state)
        return Checkpoint(cfg, out, f"{fmt}:rosinality")
    if "mapping.fc0.weight" in state:
        kwargs = json.loads(meta["init_kwargs"]) if "init_kwargs" in meta else {}
        return Checkpoint(_nvidia_config(state, kwargs), dict(state), f"{fmt}:nvidia")
    raise CheckpointError("this file does not hold a StyleGAN2 generator in a layout we know")


def load_tensor_file(path: Path, *, what: str) -> dict[str, torch.Tensor]:
    """A torch.save'd state dict of tensors, read weights-only (no code runs)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise WeightsMissingError(f"{what} file not found: {path}") from e
    except Exception as e:  # unpickling errors come in many types
        raise CheckpointError(f"cannot read {what} file {path}: {e}") from e
    if not isinstance(obj, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise CheckpointError(f"{what} file {path} is not a state dict of tensors")
    return obj


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor of a ``.safetensors`` file, and its metadata."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            return {k: f.get_tensor(k) for k in f.keys()}, meta  # noqa: SIM118
    except Exception as exc:
        raise CheckpointError(f"{path.name} is not a valid .safetensors file: {exc}") from None


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a generator checkpoint (.pkl, .pt/.pth, .safetensors) without running its code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no such checkpoint file: {path}")
    suffix = path.suffix.lower()
    if suffix == ".pkl":
        with path.open("rb") as f:
            state, kwargs = read_nvidia_pickle(f.read())
        return Checkpoint(_nvidia_config(state, kwargs), state, "nvidia-pkl")
    if suffix in (".pt", ".pth"):
        try:
            with torch.serialization.safe_globals([argparse.Namespace]):
                data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(f"{path.name} could not be read safely: {exc}") from None
        if not isinstance(data, Mapping):
            raise CheckpointError(f"{path.name} is not a checkpoint dict")
        g = data.get("g_ema", data)
        if not isinstance(g, Mapping):
            raise CheckpointError(f"{path.name} has no 'g_ema' state dict")
        state = dict(g)
        if "latent_avg" in data and "latent_avg" not in state:
            state["latent_avg"] = data["latent_avg"]
        return _from_state(state, {}, "pt")
    if suffix == ".safetensors":
        state, meta = read_safetensors(path)
        return _from_state(state, meta, "safetensors")
    raise CheckpointError(f"unknown checkpoint type {suffix!r}: use .pkl, .pt or .safetensors")


# ---------------------------------------------------------------------------------------------
# Building, hashing and saving.


def build_generator(ckpt: Checkpoint, *, device: torch.device | str = "cpu") -> Generator:
    """Instantiate the generator and load the weights (strict, except derived buffers)."""
    G = Generator(ckpt.config)
    state = {k: v for k, v in ckpt.state.items() if not k.endswith("resample_filter")}
    needs_w_avg = "mapping.w_avg" not in state
    if needs_w_avg:
        state["mapping.w_avg"] = torch.zeros(ckpt.config.w_dim)
    try:
        G.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"the weights do not fit the architecture: {exc}") from None
    G = G.eval().requires_grad_(False).to(device)
    if needs_w_avg:
        with torch.no_grad():
            gen = torch.Generator(device="cpu").manual_seed(0)
            z = torch.randn(_W_AVG_SAMPLES, ckpt.config.z_dim, generator=gen).to(device)
            G.mapping.w_avg.copy_(G.mapping(z)[:, 0].mean(0))
    return G


def content_hash(G: Generator) -> str:
    """sha256 of the architecture and every weight: the same for the same model in any format."""
    h = hashlib.sha256(G.cfg.to_json().encode())
    for key, value in sorted(G.state_dict().items()):
        h.update(key.encode())
        h.update(value.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def save_safetensors(G: Generator, path: str | Path, *, name: str = "") -> None:
    """Write our format: NVIDIA parameter names, config JSON in the metadata."""
    state = {k: v.detach().cpu().contiguous() for k, v in G.state_dict().items()}
    meta = {_FORMAT_KEY: _FORMAT, "config": G.cfg.to_json(), "name": name}
    save_file(state, str(path), metadata=meta)
