"""Read encoder checkpoints without running code from them, and write our own.

* **e4e / pSp** ``.pt``, as the authors' training saves it (``Coach.checkpoint_me``):
  ``torch.save({"state_dict": pSp.state_dict(), "opts": vars(opts), "latent_avg": ...})`` with
  ``encoder.*`` and ``decoder.*`` keys; ``latent_avg`` is [num_ws, 512] (present when trained with
  ``--start_from_latent_avg``, as e4e is); ``opts`` is a dict (an ``argparse.Namespace`` in some
  forks); ``--save_training_data`` adds ``global_step``, ``optimizer``, ``best_val_loss`` and the
  latent discriminator's states. Read with ``torch.load(weights_only=True)``, the only extra
  global allowed being ``argparse.Namespace``; anything else a file refers to is refused before it
  runs. The decoder keys are ignored: the generator is ours.
* **ours**: ``.safetensors`` (the state dict in e4e's names plus ``latent_avg``), the config JSON
  and the id of the generator it was trained for in the metadata.
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save

from engine import weights
from engine.checkpoints import read_safetensors
from engine.encoder import Encoder, EncoderConfig
from engine.errors import CheckpointError
from engine.stylegan2 import Generator
from storage.files import write_atomic

__all__ = ["LoadedEncoder", "check_fits", "encoder_file", "encoder_path", "load_encoder", "open_encoder",
           "read_e4e_checkpoint", "save_encoder"]

_FORMAT_KEY = "stylebot_format"
_FORMAT = "encoder-v1"
_SUPPORTED_TYPE = "Encoder4Editing"
_UNSUPPORTED = re.compile(r"GLOBAL ([\w.]+)")  # torch's weights_only refusals name the global


@dataclass(frozen=True)
class LoadedEncoder:
    encoder: Encoder
    name: str  # the file name
    source_format: str  # "e4e-pt" | "safetensors"
    model_id: str | None  # the generator it was trained for (ours record it; e4e files do not)


def _torch_load(path: Path) -> Any:
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"no such encoder checkpoint: {path}") from None
    except Exception as exc:  # unpickling errors come in many types
        m = _UNSUPPORTED.search(str(exc))
        if m:
            raise CheckpointError(
                f"refusing to load {path.name}: it refers to {m.group(1)}, which a weights file "
                "does not need (loading it could run code)") from None
        raise CheckpointError(f"{path.name} could not be read safely: {_reason(exc)}") from None


def _reason(exc: Exception) -> str:
    """The line of a torch.load error that says what is wrong (its first lines are advice)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith(
        ("Weights only load failed", "Please file an issue", "Check the documentation"))]
    return (useful or lines or [type(exc).__name__])[0]


def _count(state: Mapping[str, torch.Tensor], pattern: str) -> int:
    """How many consecutive indices 0, 1, ... have a key matching ``pattern % i``."""
    n = 0
    while pattern % n in state:
        n += 1
    return n


def _config_from_state(state: Mapping[str, torch.Tensor]) -> EncoderConfig:
    """The architecture an e4e encoder state dict (keys without ``encoder.``) was built with."""
    if "input_layer.0.weight" not in state or "styles.0.linear.weight" not in state:
        raise CheckpointError("this file holds no e4e encoder (no encoder.input_layer / styles)")
    num_ws = _count(state, "styles.%d.linear.weight")
    w_dim, head_channels = (int(d) for d in state["styles.0.linear.weight"].shape)
    units = _count(state, "body.%d.res_layer.1.weight")
    channels = [int(state[f"body.{k}.res_layer.1.weight"].shape[0]) for k in range(units)]
    stage_channels: list[int] = []
    stage_units: list[int] = []
    for c in channels:  # a stage is a run of units with the same width
        if stage_channels and stage_channels[-1] == c:
            stage_units[-1] += 1
        else:
            stage_channels.append(c)
            stage_units.append(1)
    if len(stage_channels) != 4:
        raise CheckpointError(f"this encoder's body has {len(stage_channels)} stages, not 4")
    se = "body.0.res_layer.5.fc1.weight" in state
    reduction = stage_channels[0] // int(state["body.0.res_layer.5.fc1.weight"].shape[0]) if se else 16
    # convs.0, convs.2, ...: a LeakyReLU between
    coarse_convs = sum(1 for k in state if re.fullmatch(r"styles\.0\.convs\.\d+\.weight", k))
    try:
        return EncoderConfig(
            num_ws=num_ws, w_dim=w_dim, input_size=16 * 2**coarse_convs,
            stage_units=tuple(stage_units), stage_channels=tuple(stage_channels),
            head_channels=head_channels, se=se, se_reduction=reduction)
    except ValueError as exc:
        raise CheckpointError(f"unsupported encoder architecture: {exc}") from None


def _latent_avg(data: Mapping[str, Any], opts: Mapping[str, Any], cfg: EncoderConfig,
                w_avg: torch.Tensor | None, name: str) -> torch.Tensor:
    """pSp adds ``latent_avg`` only with ``start_from_latent_avg``; without one saved it uses the
    generator's mean latent (our ``w_avg``)."""
    if not opts.get("start_from_latent_avg", "latent_avg" in data):
        return torch.zeros(cfg.num_ws, cfg.w_dim)
    avg = data.get("latent_avg")
    if avg is None:
        if w_avg is None:
            raise CheckpointError(f"{name} has no latent_avg: give the generator's w_avg")
        avg = w_avg
    if not isinstance(avg, torch.Tensor) or avg.shape[-1] != cfg.w_dim or avg.ndim > 2 or (
            avg.ndim == 2 and avg.shape[0] not in (1, cfg.num_ws)):
        shape = list(avg.shape) if isinstance(avg, torch.Tensor) else type(avg).__name__
        raise CheckpointError(f"{name}: latent_avg is {shape}, expected [{cfg.num_ws}, {cfg.w_dim}]")
    return avg.detach().float().reshape(-1, cfg.w_dim).expand(cfg.num_ws, cfg.w_dim).clone()


def read_e4e_checkpoint(path: str | Path, *, w_avg: torch.Tensor | None = None) -> Encoder:
    """The encoder of an e4e checkpoint, on the CPU in eval mode; no code from the file runs.

    ``w_avg`` [w_dim] stands in for ``latent_avg`` when a file trained with
    ``start_from_latent_avg`` does not carry one (pSp then uses its decoder's mean latent)."""
    path = Path(path)
    data = _torch_load(path)
    if not isinstance(data, Mapping) or not isinstance(data.get("state_dict"), Mapping):
        raise CheckpointError(f"{path.name} is not an e4e/pSp checkpoint (no state_dict)")
    raw_opts = data.get("opts")
    opts: dict[str, Any] = (vars(raw_opts) if isinstance(raw_opts, argparse.Namespace)
                            else dict(raw_opts) if isinstance(raw_opts, Mapping) else {})
    kind = opts.get("encoder_type", _SUPPORTED_TYPE)
    if kind != _SUPPORTED_TYPE:
        raise CheckpointError(f"{path.name} holds a {kind} encoder; only e4e's "
                              f"{_SUPPORTED_TYPE} is supported")
    state = {k[len("encoder."):]: v for k, v in data["state_dict"].items()
             if isinstance(k, str) and k.startswith("encoder.")}  # decoder.* ignored
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path.name}: the encoder state holds something not a tensor")
    cfg = _config_from_state(state)
    size = opts.get("stylegan_size")
    if isinstance(size, int) and size >= 4 and 2 * int(math.log2(size)) - 2 != cfg.num_ws:
        raise CheckpointError(f"{path.name}: {cfg.num_ws} W+ heads do not fit stylegan_size {size}")
    state["latent_avg"] = _latent_avg(data, opts, cfg, w_avg, path.name)
    return _build(cfg, state, path.name)


def _build(cfg: EncoderConfig, state: Mapping[str, torch.Tensor], name: str) -> Encoder:
    with torch.device("meta"):  # no random init (e4e's is 265 M numbers): the file has them all
        encoder = Encoder(cfg)
    own = encoder.state_dict()
    try:
        encoder.load_state_dict(
            {k: v.to(own[k].dtype).contiguous() if k in own else v for k, v in state.items()},
            strict=True, assign=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise CheckpointError(f"{name}: the weights do not fit the encoder: {first}") from None
    return encoder.eval().requires_grad_(False)


def save_encoder(encoder: Encoder, path: str | Path, *, model_id: str, name: str = "") -> None:
    """Write our format: e4e's parameter names, config and generator id in the metadata (through a
    temporary file: ``path`` never holds half a file)."""
    state = {k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}
    meta = {_FORMAT_KEY: _FORMAT, "config": encoder.cfg.to_json(), "model_id": model_id,
            "name": name}
    write_atomic(Path(path), lambda f: f.write(save(state, metadata=meta)))


def load_encoder(path: str | Path, *, w_avg: torch.Tensor | None = None,
                 device: torch.device | str = "cpu") -> LoadedEncoder:
    """An encoder from ``.safetensors`` (ours) or an e4e ``.pt``/``.pth``, in eval mode."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no such encoder checkpoint: {path}")
    suffix = path.suffix.lower()
    if suffix in (".pt", ".pth"):
        encoder = read_e4e_checkpoint(path, w_avg=w_avg)
        return LoadedEncoder(encoder.to(device), path.name, "e4e-pt", None)
    if suffix != ".safetensors":
        raise CheckpointError(f"unknown encoder file type {suffix!r}: use .safetensors or .pt")
    state, meta = read_safetensors(path)
    if meta.get(_FORMAT_KEY) != _FORMAT:
        raise CheckpointError(f"{path.name} is not a stylebot encoder file")
    try:
        cfg = EncoderConfig.from_json(meta["config"])
    except (KeyError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{path.name} has a malformed encoder config: {exc}") from None
    encoder = _build(cfg, state, path.name)
    return LoadedEncoder(encoder.to(device), path.name, "safetensors", meta.get("model_id") or None)


def encoder_path(model_id: str, *, home: Path | None = None) -> Path:
    """Where ``stylebot encoder train`` writes the encoder for a generator (by its id, which is
    derived from its weights' hash) and where the engine looks for one."""
    return (home if home is not None else weights.stylebot_home()) / "encoders" / f"{model_id}.safetensors"


def encoder_file(name: str, *, home: Path | None = None) -> Path:
    """An encoder by weights name (``e4e-ffhq``) or file path."""
    asset = weights.MANIFEST.get(name)
    return weights.locate(name, home=home) if asset is not None and asset.kind == "encoder" else Path(name)


def check_fits(encoder: Encoder, G: Generator, name: str) -> None:
    """Refuse an encoder whose latents are not ``G``'s W+ shape."""
    cfg = encoder.cfg
    if (cfg.num_ws, cfg.w_dim) != (G.num_ws, G.w_dim):
        raise CheckpointError(f"{name} predicts [{cfg.num_ws}, {cfg.w_dim}] latents; this "
                              f"generator takes [{G.num_ws}, {G.w_dim}]")


def open_encoder(name: str, G: Generator, *, model_id: str, generator_name: str = "",
                 home: Path | None = None, device: torch.device | str = "cpu") -> LoadedEncoder | None:
    """The encoder that ``[engine] encoder`` names for generator ``G`` (id ``model_id``, loaded as
    ``generator_name``).

    ``"none"``: None. ``"auto"``: the one trained for this generator (:func:`encoder_path`), else a
    downloaded one made for it (``e4e-ffhq`` for ``stylegan2-ffhq-1024``), else None. A weights
    name or a file: that encoder. It must predict ``G``'s W+ and, when it records the generator it
    was trained for (ours do), be this one's."""
    if name == "none":
        return None
    path: Path | None = encoder_path(model_id, home=home) if name == "auto" else encoder_file(name, home=home)
    if name == "auto" and path is not None and not path.is_file():
        path = next((p for a in weights.MANIFEST.values()
                     if a.kind == "encoder" and a.for_generator == generator_name
                     and (p := weights.find(a, home=home)) is not None), None)
    if path is None:
        return None
    found = load_encoder(path, w_avg=G.w_avg.detach().float().cpu(), device=device)
    check_fits(found.encoder, G, path.name)
    if found.model_id is not None and found.model_id != model_id:
        raise CheckpointError(f"{path.name} was trained for model {found.model_id}, not for this one "
                              f"({model_id}): train one with `stylebot encoder train`")
    return found
