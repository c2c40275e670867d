"""``stylebot encoder train``: the I/O around :func:`engine.encoder_train.train_encoder`.

Writes the encoder to ``OUT`` (our ``.safetensors``, stamped with the generator's model id) and the
training state beside it in ``OUT.train.safetensors`` (encoder, Adam's moments, the step and the
settings) every ``save_every`` steps and at the end. Run again with the same ``--out`` and it
resumes from that state (with the settings it was started with), e.g. after an interruption or to
train for more steps; ``restart`` starts afresh.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save

from engine.checkpoints import read_safetensors
from engine.encoder import Encoder, EncoderConfig
from engine.encoder_io import check_fits, encoder_file, encoder_path, load_encoder, save_encoder
from engine.encoder_train import TrainState, evaluate_encoder, new_encoder, train_encoder
from engine.errors import CheckpointError, EngineError
from engine.generators import LoadedGenerator, load_generator, resolve_device
from engine.perceptual import load_perceptual
from engine.progress import ProgressFn, no_progress
from engine.stylegan2 import Generator
from storage.files import write_atomic

__all__ = ["ARCHS", "TrainSettings", "encoder_config", "run_train", "summary", "train_state_path"]

ARCHS = ("auto", "e4e", "small")
_STATE_FORMAT = "encoder-train-v1"


@dataclass(frozen=True)
class TrainSettings:
    """What a resumed run keeps from the run that started it."""

    batch_size: int = 8
    lr: float = 1e-4
    seed: int = 0


def encoder_config(G: Generator, arch: str, *, is_demo: bool) -> EncoderConfig:
    """``e4e``: e4e's IR-SE 50 at 256 px for ``G``'s W+; ``small``: a thin 4-unit body and 64-wide
    heads at ``G``'s resolution up to 256 (CPU-sized: the demo model, tests); ``auto``: small for
    the demo model, e4e for the others."""
    if arch not in ARCHS:
        raise EngineError(f"unknown encoder architecture {arch!r}: use {', '.join(ARCHS)}")
    if arch == "e4e" or (arch == "auto" and not is_demo):
        return EncoderConfig(num_ws=G.num_ws, w_dim=G.w_dim)
    return EncoderConfig(num_ws=G.num_ws, w_dim=G.w_dim, input_size=min(256, max(32, G.resolution)),
                         stage_units=(1, 1, 1, 1), stage_channels=(16, 32, 48, 64),
                         head_channels=64, se_reduction=4)


def train_state_path(out: Path) -> Path:
    """``enc.safetensors`` -> ``enc.train.safetensors``."""
    return out.with_suffix(".train.safetensors")


def _save_state(path: Path, state: TrainState, *, cfg: EncoderConfig, model_id: str,
                settings: TrainSettings) -> None:
    tensors = {f"encoder.{k}": v.contiguous() for k, v in state.encoder.items()}
    for index, moments in state.optimizer.items():
        tensors.update({f"adam.{index}.{k}": v.contiguous() for k, v in moments.items()})
    meta = {"stylebot_format": _STATE_FORMAT, "step": str(state.step), "config": cfg.to_json(),
            "model_id": model_id, "settings": json.dumps(asdict(settings))}
    write_atomic(path, lambda f: f.write(save(tensors, metadata=meta)))


def _load_state(path: Path) -> tuple[TrainState, EncoderConfig, str, TrainSettings]:
    try:
        tensors, meta = read_safetensors(path)
        if meta.get("stylebot_format") != _STATE_FORMAT:
            raise ValueError("not an encoder training state")
        cfg = EncoderConfig.from_json(meta["config"])
        settings = TrainSettings(**json.loads(meta["settings"]))
        step = int(meta["step"])
    except Exception as exc:
        raise CheckpointError(f"cannot resume from {path}: {exc}; delete it or use --restart"
                              ) from None
    encoder = {k.removeprefix("encoder."): v for k, v in tensors.items() if k.startswith("encoder.")}
    optimizer: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("adam."):
            _, index, name = key.split(".", 2)
            optimizer.setdefault(int(index), {})[name] = value
    return TrainState(step, encoder, optimizer), cfg, meta["model_id"], settings


def _initial(loaded: LoadedGenerator, arch: str, init: str | None) -> Encoder:
    """A new encoder, or ``init`` (any with ``G``'s W+ shape: also one made for another generator)."""
    G = loaded.G
    if init is None:
        return new_encoder(G, encoder_config(G, arch, is_demo=loaded.is_demo))
    path = encoder_file(init)
    encoder = load_encoder(path, w_avg=G.w_avg.detach().cpu()).encoder
    check_fits(encoder, G, path.name)
    return encoder.to(G.w_avg.device)


def run_train(
    *,
    model: str,
    out: Path | None,
    steps: int,
    settings: TrainSettings = TrainSettings(),
    save_every: int = 500,
    arch: str = "auto",
    init: str | None = None,
    restart: bool = False,
    device: str = "auto",
    progress: ProgressFn = no_progress,
    say: Callable[[str], None] = lambda text: None,
) -> dict[str, Any]:
    """Train (or resume training) an encoder for ``model``; returns a report (:func:`summary`).
    ``out`` None: where the engine looks for this generator's encoder (``encoder_path``)."""
    if out is not None and out.suffix != ".safetensors":
        raise EngineError("the encoder is written as .safetensors: name the output *.safetensors")
    if out is not None and not out.parent.is_dir():
        raise EngineError(f"output folder does not exist: {out.parent}")
    if steps < 1 or settings.batch_size < 1 or save_every < 0:
        raise EngineError("--steps and --batch-size must be at least 1, --save-every at least 0")
    loaded = load_generator(model, device=resolve_device(device))
    G = loaded.G
    say(f"model: {loaded.label} [{loaded.model_id}]")
    if out is None:
        out = encoder_path(loaded.model_id)
        out.parent.mkdir(parents=True, exist_ok=True)
    state_file = train_state_path(out)
    resume: TrainState | None = None
    if state_file.exists() and not restart:
        resume, cfg, model_id, settings = _load_state(state_file)
        if model_id != loaded.model_id:
            raise EngineError(f"{state_file} is training an encoder for model {model_id}, not "
                              f"{loaded.model_id}: use another --out, or --restart")
        encoder = new_encoder(G, cfg)
        say(f"resuming from step {resume.step} of {steps} ({state_file}; batch size "
            f"{settings.batch_size}, lr {settings.lr:g}, seed {settings.seed} as started)")
    else:
        encoder = _initial(loaded, arch, init)
        cfg = encoder.cfg
    perceptual = load_perceptual(device=G.w_avg.device)
    if perceptual.is_demo:
        say("LPIPS: demo stand-in (no VGG16 weights: `stylebot weights fetch vgg16-imagenet`)")

    def on_save(state: TrainState) -> None:
        _save_state(state_file, state, cfg=cfg, model_id=loaded.model_id, settings=settings)
        save_encoder(encoder, out, model_id=loaded.model_id, name=f"step {state.step}")

    result = train_encoder(G, encoder, perceptual=perceptual, steps=steps,
                           batch_size=settings.batch_size, lr=settings.lr, seed=settings.seed,
                           resume=resume, save_every=save_every, on_save=on_save,
                           progress=progress)
    if resume is not None and resume.step >= steps:
        say(f"already trained for {resume.step} steps; ask for more with --steps")
    quality = evaluate_encoder(G, encoder, perceptual=perceptual)
    trained = result.steps - result.start_step
    report = {"out": str(out), "steps": result.steps, "trained_now": trained,
              "seconds": round(result.seconds, 2),
              "steps_per_s": round(trained / result.seconds, 3) if trained else None,
              "psnr": round(quality["psnr"], 2), "lpips": round(quality["lpips"], 4),
              "latent": round(quality["latent"], 4), "model_id": loaded.model_id,
              "lpips_network": "demo stand-in" if perceptual.is_demo else "LPIPS VGG16"}
    return report


def summary(report: dict[str, Any]) -> str:
    """The line the CLI ends with."""
    return (f"encoder at step {report['steps']}: PSNR {report['psnr']} dB on held-out samples "
            f"({report['lpips_network']}: {report['lpips']}); {report['trained_now']} steps in "
            f"{report['seconds']} s; written to {report['out']}")
