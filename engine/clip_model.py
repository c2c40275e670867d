"""CLIP for StyleCLIP edits: load it without running code from the weights file, encode images and text.

OpenAI's released CLIP files (``ViT-B-32.pt``) are TorchScript archives. ``clip.load`` would call
``torch.jit.load`` on them, which deserialises TorchScript and may run code from the file. We never
do: :func:`read_torchscript_state_dict` reads the archive's ``data.pkl`` with a restricted unpickler
(``__torch__.*`` classes become inert stand-ins that only keep their pickled state, tensors are
rebuilt from the zip's ``data/`` records, every other global is refused), walks the module tree into
a flat state dict and hands it to ``clip.model.build_model``. Plain state-dict files go through
``torch.load(weights_only=True)``; ``.safetensors`` through safetensors.

The ``demo`` CLIP is a tiny CLIP with deterministic random weights: no download, fast on CPU, and
meaningless as a text/image model (it only exercises the code paths).
"""

from __future__ import annotations

import collections
import hashlib
import io
import pickle
import warnings
import zipfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from engine import weights
from engine.errors import CheckpointError, EngineError

with warnings.catch_warnings():
    # clip imports pkg_resources, which warns that it is deprecated; nothing for users to act on.
    warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning, module="pkg_resources")
    import clip
    import clip.model

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "DEMO_CLIP_NAME",
    "DEMO_CLIP_SEED",
    "REAL_CLIP",
    "TEMPLATES",
    "ClipModel",
    "build_demo_clip",
    "demo_clip_state_dict",
    "is_torchscript_archive",
    "load_clip",
    "read_torchscript_state_dict",
]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

REAL_CLIP = "clip-vit-b32"  # the weights manifest entry "auto" uses when it is cached
DEMO_CLIP_NAME = "demo CLIP (random weights)"
DEMO_CLIP_SEED = 20261126

# Photo prompts in the style of the ImageNet templates StyleCLIP averages over.
TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a good photo of a {}.",
    "a close-up photo of a {}.",
    "a bright photo of a {}.",
    "a cropped photo of a {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a close-up photo of the {}.",
    "a bright photo of the {}.",
    "a photo of one {}.",
    "a low resolution photo of a {}.",
    "a jpeg photo of a {}.",
    "a blurry photo of a {}.",
    "a bad photo of a {}.",
)

_DEMO_ARCH: dict[str, int] = dict(
    embed_dim=64, image_resolution=64, vision_layers=2, vision_width=64, vision_patch_size=8,
    context_length=77, vocab_size=49408, transformer_width=64, transformer_heads=1,
    transformer_layers=2,
)
# Tensors OpenAI's TorchScript files carry as buffers that are not CLIP weights (build_model drops
# them too).
_NON_WEIGHT_KEYS = ("input_resolution", "context_length", "vocab_size")


class ClipModel:
    """A frozen CLIP (float32, eval) with the image/text encoders StyleCLIP needs."""

    def __init__(
        self, *, model: clip.model.CLIP, name: str, is_demo: bool, model_key: str,
        device: torch.device | str = "cpu",
    ) -> None:
        self.device = torch.device(device)
        self.model = model.float().to(self.device).eval().requires_grad_(False)
        self.name = name
        self.is_demo = is_demo
        self.model_key = model_key  # first 16 hex of a sha256 over the weights: a cache key
        self._mean = torch.tensor(CLIP_MEAN, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(CLIP_STD, device=self.device).view(1, 3, 1, 1)

    @property
    def input_resolution(self) -> int:
        return int(self.model.visual.input_resolution)

    @property
    def context_length(self) -> int:
        return int(self.model.context_length)

    @property
    def embed_dim(self) -> int:
        return int(self.model.text_projection.shape[1])

    def __repr__(self) -> str:
        return (f"ClipModel(name={self.name!r}, is_demo={self.is_demo}, model_key={self.model_key!r}, "
                f"input_resolution={self.input_resolution}, device={str(self.device)!r})")

    def encode_images(self, images: Tensor) -> Tensor:
        """[B, 3, H, W] in [-1, 1] -> [B, D] unit vectors; differentiable w.r.t. ``images``."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images [B, 3, H, W], got {list(images.shape)}")
        x = (images.to(self.device, torch.float32) + 1.0) / 2.0  # [B, 3, H, W] in [0, 1]
        h, w = x.shape[-2:]
        side = min(h, w)
        if h != w:  # center-crop to a square, like CLIP's preprocessing
            top, left = (h - side) // 2, (w - side) // 2
            x = x[:, :, top:top + side, left:left + side]  # [B, 3, S, S]
        res = self.input_resolution
        if side != res:
            x = F.interpolate(x, size=(res, res), mode="bicubic", align_corners=False,
                              antialias=side > res)  # [B, 3, R, R]
        x = (x - self._mean) / self._std
        feats = self.model.encode_image(x).float()  # [B, D]
        return F.normalize(feats, dim=-1)

    def encode_text(self, texts: Sequence[str]) -> Tensor:
        """N texts -> [N, D] unit vectors (no grad); texts longer than the context are truncated."""
        if isinstance(texts, str):
            raise TypeError("encode_text takes a sequence of texts; use text_embedding for one text")
        if not texts:
            return torch.empty(0, self.embed_dim, device=self.device)
        tokens = clip.tokenize(list(texts), context_length=self.context_length, truncate=True)
        with torch.no_grad():
            feats = self.model.encode_text(tokens.to(self.device)).float()  # [N, D]
        return F.normalize(feats, dim=-1)

    def _template_means(self, texts: Sequence[str], templates: Sequence[str]) -> Tensor:
        """[N, D]: per text, the renormalised mean of its unit embeddings over the templates."""
        if not templates:
            raise ValueError("templates must not be empty")
        feats = self.encode_text([t.format(text) for text in texts for t in templates])  # [N*T, D]
        means = feats.view(len(texts), len(templates), -1).mean(dim=1)  # [N, D]
        return F.normalize(means, dim=-1)

    def text_embedding(self, text: str, *, templates: Sequence[str] = TEMPLATES) -> Tensor:
        """[D]: the mean of the unit embeddings of ``text`` in every template, renormalised."""
        return self._template_means([text], templates)[0]

    def text_direction(self, target: str, neutral: str, *, templates: Sequence[str] = TEMPLATES) -> Tensor:
        """[D]: StyleCLIP's delta t, the unit vector from the neutral text to the target text."""
        target_emb, neutral_emb = self._template_means([target, neutral], templates)  # [D] each
        delta = target_emb - neutral_emb  # [D]
        if float(delta.norm()) < 1e-6:
            raise EngineError(
                f"{target[:60]!r} and {neutral[:60]!r} mean the same to CLIP: describe a change")
        return F.normalize(delta, dim=0)


# ---------------------------------------------------------------------------------------------
# Reading TorchScript archives without torch.jit.load.


class _ScriptObject:
    """Stand-in for a TorchScript object: keeps the state pickled for it, runs nothing."""

    type_name: ClassVar[str] = "__torch__"
    state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state


class _StorageType:
    """Stand-in for ``torch.FloatStorage`` and friends in a persistent id: just its dtype."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype


class _Storage:
    def __init__(self, flat: Tensor) -> None:
        self.flat = flat  # [numel], the storage's elements


_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "HalfStorage": torch.float16, "BFloat16Storage": torch.bfloat16,
    "DoubleStorage": torch.float64, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


def _int_tuple(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, tuple | list) or not all(type(v) is int for v in value):
        raise CheckpointError(f"a tensor in this archive has a malformed {what}")
    return tuple(value)


def _rebuild_tensor(
    storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any = False,
    hooks: Any = None, metadata: Any = None,
) -> Tensor:
    """Safe ``torch._utils._rebuild_tensor_v2``: a bounds-checked view of a storage read from the zip."""
    if not isinstance(storage, _Storage) or type(offset) is not int:
        raise CheckpointError("a tensor in this archive is malformed")
    shape, strides = _int_tuple(size, "size"), _int_tuple(stride, "stride")
    if len(shape) != len(strides) or offset < 0 or min((*shape, *strides, 0)) < 0:
        raise CheckpointError("a tensor in this archive has an invalid size or stride")
    numel = storage.flat.numel()
    if all(shape):
        last = offset + sum((n - 1) * s for n, s in zip(shape, strides, strict=True))
        if last >= numel:
            raise CheckpointError("a tensor in this archive reaches past the end of its storage")
    return storage.flat.as_strided(shape, strides, offset if numel else 0)


def _as_list(items: Any) -> list[Any]:  # torch.jit._pickle.build_intlist and friends
    if not isinstance(items, list):
        raise CheckpointError("a list in this archive is malformed")
    return items


def _restore_type_tag(value: Any, type_str: Any) -> Any:  # torch.jit._pickle.restore_type_tag
    return value


_SAFE_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch.jit._pickle", "restore_type_tag"): _restore_type_tag,
    **{("torch.jit._pickle", f"build_{k}list"): _as_list for k in ("int", "double", "bool", "tensor")},
    **{("torch", name): _StorageType(dtype) for name, dtype in _STORAGE_DTYPES.items()},
}


class _TorchScriptUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, *, load_storage: Callable[[torch.dtype, str, int], _Storage]) -> None:
        super().__init__(io.BytesIO(data))
        self._load_storage = load_storage
        self._classes: dict[str, type[_ScriptObject]] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "__torch__" or module.startswith("__torch__."):
            qualname = f"{module}.{name}"
            if qualname not in self._classes:
                self._classes[qualname] = type(name, (_ScriptObject,), {"type_name": qualname})
            return self._classes[qualname]
        try:
            return _SAFE_GLOBALS[(module, name)]
        except KeyError:
            raise CheckpointError(
                f"refusing to load this TorchScript archive: its data.pkl refers to {module}.{name}, "
                "which a weights file does not need (loading it could run code)"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) == 5):
            raise CheckpointError("refusing to load this TorchScript archive: unexpected persistent id")
        kind, storage_type, key, location, numel = pid
        kind = kind.decode("ascii", "replace") if isinstance(kind, bytes) else kind
        if (kind != "storage" or not isinstance(storage_type, _StorageType) or not isinstance(key, str)
                or not isinstance(location, str) or type(numel) is not int or numel < 0):
            raise CheckpointError("refusing to load this TorchScript archive: malformed storage reference")
        return self._load_storage(storage_type.dtype, key, numel)


def _archive_prefix(names: Sequence[str]) -> str | None:
    """The archive's top folder ("name/") holding data.pkl; None when there is not exactly one."""
    found = [n[: -len("data.pkl")] for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
    return found[0] if len(found) == 1 else None


def is_torchscript_archive(path: str | Path) -> bool:
    """True for a TorchScript zip (``code/`` or ``constants.pkl`` beside ``data.pkl``); loads nothing."""
    try:
        if not zipfile.is_zipfile(path):
            return False
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (OSError, zipfile.BadZipFile):
        return False
    prefix = _archive_prefix(names)
    if prefix is None:
        return False
    return f"{prefix}constants.pkl" in names or any(n.startswith(f"{prefix}code/") for n in names)


def _read_record(zf: zipfile.ZipFile, name: str, nbytes: int) -> bytearray:
    try:
        info = zf.getinfo(name)
    except KeyError:
        raise CheckpointError(f"this TorchScript archive has no record {name}") from None
    if info.file_size != nbytes:
        raise CheckpointError(f"record {name} holds {info.file_size} bytes, its tensor needs {nbytes}")
    buf, done = bytearray(nbytes), 0
    with zf.open(info) as f:  # in chunks: one copy of the tensor in memory, not two
        while done < nbytes:
            chunk = f.read(min(1 << 24, nbytes - done))
            if not chunk:
                raise CheckpointError(f"record {name} is truncated")
            buf[done:done + len(chunk)] = chunk
            done += len(chunk)
    return buf


def _collect(obj: _ScriptObject, prefix: str, out: dict[str, Tensor], path: set[int]) -> None:
    """Add every tensor attribute under ``obj`` to ``out`` with dotted names (like a state dict)."""
    if len(path) > 100:
        raise CheckpointError("this TorchScript archive nests modules too deeply")
    if id(obj) in path or not isinstance(obj.state, dict):
        return  # a cycle, or custom __getstate__ data (no module attributes to walk)
    path.add(id(obj))
    for key, value in obj.state.items():
        if not isinstance(key, str):
            continue
        if isinstance(value, Tensor):
            out[prefix + key] = value
        elif isinstance(value, _ScriptObject):
            _collect(value, f"{prefix}{key}.", out, path)
    path.discard(id(obj))


def read_torchscript_state_dict(path: str | Path) -> dict[str, Tensor]:
    """A TorchScript module's tensors by dotted name, read without ``torch.jit.load`` (runs no code)."""
    path = Path(path)
    if not is_torchscript_archive(path):
        raise CheckpointError(f"{path.name} is not a TorchScript archive")
    try:
        with zipfile.ZipFile(path) as zf:
            prefix = _archive_prefix(zf.namelist())
            assert prefix is not None  # checked by is_torchscript_archive
            if f"{prefix}byteorder" in zf.namelist() and zf.read(f"{prefix}byteorder").strip() != b"little":
                raise CheckpointError(f"{path.name} was saved on a big-endian machine; not supported")
            storages: dict[str, _Storage] = {}

            def load_storage(dtype: torch.dtype, key: str, numel: int) -> _Storage:
                if key not in storages:
                    nbytes = numel * torch.empty((), dtype=dtype).element_size()
                    raw = _read_record(zf, f"{prefix}data/{key}", nbytes)
                    flat = torch.frombuffer(raw, dtype=dtype) if numel else torch.empty(0, dtype=dtype)
                    storages[key] = _Storage(flat)
                if storages[key].flat.dtype != dtype:
                    raise CheckpointError(f"storage {key} is referenced with two different dtypes")
                return storages[key]

            data = zf.read(f"{prefix}data.pkl")
            top = _TorchScriptUnpickler(data, load_storage=load_storage).load()
    except CheckpointError as e:
        raise CheckpointError(f"{path.name}: {e.message}") from None
    except Exception as e:  # a malformed archive or pickle: one clear line, not a traceback
        raise CheckpointError(f"{path.name}: could not read its TorchScript data ({e})") from None
    if not isinstance(top, _ScriptObject):
        raise CheckpointError(f"{path.name}: its data.pkl does not hold a TorchScript module")
    state: dict[str, Tensor] = {}
    _collect(top, "", state, set())
    if not state:
        raise CheckpointError(f"{path.name}: this TorchScript module holds no tensors")
    return state


# ---------------------------------------------------------------------------------------------
# Loading.


def _read_plain_state_dict(path: Path) -> dict[str, Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(path)))
        except Exception as e:
            raise CheckpointError(f"{path.name}: not a readable .safetensors file ({e})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"refusing to load {path.name}: it holds more than tensors (loading it could run code)"
        ) from None
    except Exception as e:
        raise CheckpointError(f"{path.name}: not a CLIP checkpoint torch can read ({e})") from None
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path.name}: expected a state dict, found {type(obj).__name__}")
    return {str(k): v for k, v in obj.items() if isinstance(v, Tensor)}


def _build(state: Mapping[str, Tensor], *, source: str) -> clip.model.CLIP:
    """``clip.model.build_model`` on a state dict, float32 on CPU, eval, frozen."""
    sd = {k: v for k, v in state.items() if k not in _NON_WEIGHT_KEYS}
    try:
        with torch.random.fork_rng(devices=[]):  # CLIP's __init__ draws (then discards) random weights
            model = clip.model.build_model(sd)
    except (KeyError, RuntimeError, ValueError, IndexError, AssertionError, ZeroDivisionError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{source} is not a CLIP model this code can build ({first[:200]})") from None
    return model.float().eval().requires_grad_(False)


def _model_key(model: torch.nn.Module) -> str:
    """First 16 hex of a sha256 over the sorted float32 weights: same weights -> same key."""
    h = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        t = value.detach().to("cpu", torch.float32).contiguous()
        h.update(f"{key}:{list(t.shape)};".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


def _finish(model: clip.model.CLIP, *, name: str, is_demo: bool, device: torch.device | str) -> ClipModel:
    return ClipModel(model=model, name=name, is_demo=is_demo, model_key=_model_key(model), device=device)


def demo_clip_state_dict(*, seed: int = DEMO_CLIP_SEED) -> dict[str, Tensor]:
    """A tiny ViT CLIP's weights (embed 64, 64 px, 2+2 layers), drawn deterministically from ``seed``.

    The weights are CLIP's own initialisation under a forked, seeded RNG (the global RNG is left
    alone), passed once through ``build_model`` (which stores matrices in float16), so loading them
    again reproduces them exactly. The image class token starts at zero: with CLIP's random init its
    constant start dominates and every image embeds within cos ~0.99 of every other; from zero, it
    is all attention over the patches, and unrelated images spread out (mean cos ~0.65).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        raw = clip.model.CLIP(**_DEMO_ARCH)
    state = raw.state_dict()
    state["visual.class_embedding"] = torch.zeros_like(state["visual.class_embedding"])  # [W]
    state["visual.positional_embedding"] = state["visual.positional_embedding"].clone()  # [1 + G*G, W]
    state["visual.positional_embedding"][0] = 0
    model = _build(state, source="the demo CLIP")
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def build_demo_clip(*, seed: int = DEMO_CLIP_SEED, device: torch.device | str = "cpu") -> ClipModel:
    """The demo CLIP: random weights, no download, fast on CPU. Not a real image/text model."""
    model = _build(demo_clip_state_dict(seed=seed), source="the demo CLIP")
    return _finish(model, name=DEMO_CLIP_NAME, is_demo=True, device=device)


def load_clip(
    model: str | Path = "auto", *, device: torch.device | str = "cpu", home: Path | None = None
) -> ClipModel:
    """``auto`` (ViT-B/32 when cached, else demo), ``demo``, ``clip-vit-b32``, or a file path.

    A TorchScript archive is read by :func:`read_torchscript_state_dict` (no ``torch.jit.load``);
    any other file as a weights-only state dict. Raises WeightsMissingError / CheckpointError.
    """
    if model == "auto":
        model = REAL_CLIP if weights.find(REAL_CLIP, home=home) is not None else "demo"
    if model == "demo":
        return build_demo_clip(device=device)
    if isinstance(model, str) and model in weights.MANIFEST:
        if weights.MANIFEST[model].kind != "clip":
            raise EngineError(f"{model} is not a CLIP model")
        path = weights.locate(model, home=home)
        name = model
    else:
        path = Path(model).expanduser()
        if not path.is_file():
            names = ", ".join(n for n, a in weights.MANIFEST.items() if a.kind == "clip")
            raise EngineError(f"unknown CLIP model {model!r}: give a CLIP file, 'auto', 'demo', or {names}")
        name = path.name
    if is_torchscript_archive(path):
        state = read_torchscript_state_dict(path)
    else:
        state = _read_plain_state_dict(path)
    return _finish(_build(state, source=path.name), name=name, is_demo=False, device=device)
