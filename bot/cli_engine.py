"""The CLI's engine commands: thin I/O wrappers around the pure engine functions.

Imported lazily by :mod:`bot.cli` (this module imports torch)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm import tqdm

from engine import weights
from engine.align import FaceDetector, align_face, load_photo
from engine.checkpoints import build_generator, load_checkpoint, save_safetensors
from engine.errors import EngineError
from engine.images import pil_to_tensor, tensor_to_pil
from engine.invert import invert
from engine.latents import load_latent, save_latent
from engine.models import LoadedGenerator, load_generator, resolve_device
from engine.morph import morph_latents, render_frames
from engine.perceptual import load_perceptual
from engine.progress import ProgressFn
from engine.video import write_animation

__all__ = ["Bar", "dispatch", "load_model", "output_path", "say"]

DEFAULT_STEPS = 300


class Bar:
    """A tqdm progress bar behind the engine's progress(step, total, info) callback."""

    def __init__(self, desc: str, *, unit: str = "step") -> None:
        self.bar: tqdm[Any] | None = None
        self.desc, self.unit = desc, unit

    def __call__(self, step: int, total: int, info: dict[str, Any]) -> None:
        if self.bar is None:
            self.bar = tqdm(total=total or None, desc=self.desc, unit=self.unit, file=sys.stderr,
                            dynamic_ncols=True, unit_scale=self.unit == "B")
        self.bar.n = step
        shown = {k: f"{v:.3g}" for k, v in info.items() if isinstance(v, float)}
        if shown:
            self.bar.set_postfix(shown, refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def say(text: str) -> None:
    print(text, file=sys.stderr)


def load_model(args: argparse.Namespace) -> LoadedGenerator:
    loaded = load_generator(args.model, device=resolve_device(args.device))
    say(f"model: {loaded.label} [{loaded.model_id}]")
    return loaded


def output_path(name: str) -> Path:
    """An output file path whose folder exists (else a clear error)."""
    path = Path(name)
    if not path.parent.exists():
        raise EngineError(f"output folder does not exist: {path.parent}")
    return path


def _align(args: argparse.Namespace) -> int:
    out = output_path(args.output)
    face = align_face(load_photo(args.photo), size=args.size, detector=FaceDetector())
    face.image.save(out)
    if face.note:
        say(face.note)
    say(f"aligned face written to {out}")
    return 0


def _invert(args: argparse.Namespace) -> int:
    out = Path(args.output)
    steps = args.steps or DEFAULT_STEPS
    if steps < 1:
        raise EngineError("--steps must be at least 1")
    photo = load_photo(args.photo)
    loaded = load_model(args)
    device = loaded.G.w_avg.device
    face = align_face(photo, size=loaded.G.resolution, detector=FaceDetector(device=str(device)))
    if face.note:
        say(face.note)
    perceptual = load_perceptual(device=device)
    out.mkdir(parents=True, exist_ok=True)
    bar = Bar("inverting")
    try:
        result = invert(loaded.G, pil_to_tensor(face.image), perceptual=perceptual, steps=steps,
                        optimize_noise=args.optimize_noise, progress=bar)
    finally:
        bar.close()
    save_latent(out / "latent.npy", result.latents[0], model_id=loaded.model_id)
    face.image.save(out / "aligned.png")
    tensor_to_pil(result.images[0]).save(out / "reconstruction.png")
    (out / "alignment.json").write_text(json.dumps(face.alignment.to_json()) + "\n")
    report = {
        "psnr": round(result.psnr[0], 3),
        "lpips": round(result.lpips[0], 5),
        "lpips_network": "demo stand-in (not LPIPS)" if perceptual.is_demo else "LPIPS VGG16",
        "steps": result.steps,
        "seconds": round(result.seconds, 3),
        "model_id": loaded.model_id,
        "model": loaded.label,
        "resolution": loaded.G.resolution,
        "note": face.note,
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    say(f"PSNR {report['psnr']:.2f} dB, {report['seconds']:.1f} s; files in {out}")
    return 0


def _render(args: argparse.Namespace) -> int:
    out = output_path(args.output)
    loaded = load_model(args)
    G = loaded.G
    ws = load_latent(args.latent, model_id=loaded.model_id, num_ws=G.num_ws, w_dim=G.w_dim)
    frames = render_frames(G, ws.unsqueeze(0).to(G.w_avg.device), noise_mode=args.noise)
    Image.fromarray(frames[0]).save(out)
    say(f"rendered {out}")
    return 0


def _morph(args: argparse.Namespace) -> int:
    out = output_path(args.output)
    if out.suffix.lower() not in (".mp4", ".gif"):
        raise EngineError("the output must end in .mp4 or .gif")
    loaded = load_model(args)
    G = loaded.G
    a, b = (load_latent(p, model_id=loaded.model_id, num_ws=G.num_ws, w_dim=G.w_dim)
            for p in (args.a, args.b))
    ws = morph_latents(a, b, frames=args.frames, layers=args.layers, easing=args.easing,
                       pingpong=args.pingpong)
    bar = Bar("rendering", unit="frame")
    try:
        frames = render_frames(G, ws.to(G.w_avg.device), progress=bar)
    finally:
        bar.close()
    write_animation(frames, out, fps=args.fps)
    say(f"{len(frames)} frames written to {out}")
    return 0


def _weights(args: argparse.Namespace) -> int:
    action = args.weights_command
    if action == "list":
        for row in weights.list_assets():
            state = "present" if row.present else "missing"
            print(f"{row.name:22} {row.kind:10} {state:8} {row.hash_kind:27} {row.licence}")
            print(f"{'':22} {row.path}")
        return 0
    if action == "fetch":
        for name in args.names:
            bar = Bar(name, unit="B")
            progress: ProgressFn = bar
            try:
                path = weights.fetch(name, progress=progress, force=args.force)
            finally:
                bar.close()
            say(f"{name}: {path}")
        return 0
    if action == "verify":
        names = args.names or [r.name for r in weights.list_assets() if r.present]
        bad = 0
        for name in names:
            result = weights.verify(name)
            print(f"{name}: {result.message}")
            bad += not result.ok
        return 1 if bad else 0
    if action == "convert":
        out = output_path(args.output)
        if out.suffix != ".safetensors":
            raise EngineError("convert writes .safetensors: name the output *.safetensors")
        G = build_generator(load_checkpoint(args.source))
        save_safetensors(G, out, name=Path(args.source).name)
        say(f"converted {args.source} -> {out}")
        return 0
    raise EngineError(f"unknown weights action {action!r}")


def _encoder(args: argparse.Namespace) -> int:
    from engine.encoder_cmd import TrainSettings, run_train, summary

    bar = Bar("training encoder")
    try:
        report = run_train(
            model=args.model, out=Path(args.out), steps=args.steps,
            settings=TrainSettings(batch_size=args.batch_size, lr=args.lr, seed=args.seed),
            save_every=args.save_every, arch=args.arch, init=args.init, restart=args.restart,
            device=args.device, progress=bar, say=say)
    finally:
        bar.close()
    say(summary(report, Path(args.out)))
    return 0


def dispatch(args: argparse.Namespace) -> int:
    if args.command in ("edit", "directions"):
        from bot import cli_edit

        return cli_edit.edit(args) if args.command == "edit" else cli_edit.directions(args)
    commands = {"align": _align, "invert": _invert, "render": _render, "morph": _morph,
                "weights": _weights, "encoder": _encoder}
    return commands[args.command](args)
