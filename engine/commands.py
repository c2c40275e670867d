"""The engine's commands: thin I/O wrappers around the operations in :mod:`engine.operations`.

Imported by :mod:`engine.cli` once a command runs (this module imports torch)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from PIL import Image

from engine import weights
from engine.align import FaceDetector, align_face, load_photo
from engine.checkpoints import build_generator, load_checkpoint, save_safetensors
from engine.console import Bar, load_model, output_path, say
from engine.encoder_io import open_encoder
from engine.errors import EngineError
from engine.images import tensor_to_pil
from engine.latents import load_latent, save_latent
from engine.morph import render_frames
from engine.operations import inversion_quality, invert_faces, morph_frames
from engine.perceptual import load_perceptual
from engine.progress import ProgressFn
from engine.video import write_animation

__all__ = ["align", "invert", "morph", "render", "weights_command"]


def align(args: argparse.Namespace) -> int:
    out = output_path(args.output)
    face = align_face(load_photo(args.photo), size=args.size, detector=FaceDetector())
    face.image.save(out)
    if face.note:
        say(face.note)
    say(f"aligned face written to {out}")
    return 0


def invert(args: argparse.Namespace) -> int:
    out = Path(args.output)
    if args.steps is not None and args.steps < 0:
        raise EngineError("--steps must be at least 1")
    photo = load_photo(args.photo)
    loaded = load_model(args)
    device = loaded.G.w_avg.device
    face = align_face(photo, size=loaded.G.resolution, detector=FaceDetector(device=str(device)))
    if face.note:
        say(face.note)
    perceptual = load_perceptual(device=device)
    found = open_encoder(args.encoder, loaded.G, model_id=loaded.model_id, generator_name=loaded.name,
                         device=device)
    if found is not None:
        say(f"starting from encoder {found.name}")
    out.mkdir(parents=True, exist_ok=True)

    def first_look(images: torch.Tensor) -> None:
        tensor_to_pil(images[0]).save(out / "first_look.png")

    bar = Bar("inverting")
    try:
        result = invert_faces(loaded.G, [face], perceptual=perceptual, steps=args.steps,
                              encoder=found.encoder if found is not None else None,
                              optimize_noise=args.optimize_noise, progress=bar,
                              first_look=first_look)
    finally:
        bar.close()
    save_latent(out / "latent.npy", result.latents[0], model_id=loaded.model_id)
    face.image.save(out / "aligned.png")
    tensor_to_pil(result.images[0]).save(out / "reconstruction.png")
    (out / "alignment.json").write_text(json.dumps(face.alignment.to_json()) + "\n")
    report = {
        **inversion_quality(result, 0),
        "lpips_network": "demo stand-in (not LPIPS)" if perceptual.is_demo else "LPIPS VGG16",
        "model_id": loaded.model_id,
        "model": loaded.label,
        "resolution": loaded.G.resolution,
        "note": face.note,
        "encoder": found.name if found is not None else None,
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    say(f"PSNR {report['psnr']:.2f} dB, {report['seconds']:.1f} s; files in {out}")
    return 0


def render(args: argparse.Namespace) -> int:
    out = output_path(args.output)
    loaded = load_model(args)
    G = loaded.G
    ws = load_latent(args.latent, model_id=loaded.model_id, num_ws=G.num_ws, w_dim=G.w_dim)
    frames = render_frames(G, ws.unsqueeze(0).to(G.w_avg.device), noise_mode=args.noise)
    Image.fromarray(frames[0]).save(out)
    say(f"rendered {out}")
    return 0


def morph(args: argparse.Namespace) -> int:
    out = output_path(args.output)
    if out.suffix.lower() not in (".mp4", ".gif"):
        raise EngineError("the output must end in .mp4 or .gif")
    loaded = load_model(args)
    G = loaded.G
    a, b = (load_latent(p, model_id=loaded.model_id, num_ws=G.num_ws, w_dim=G.w_dim)
            for p in (args.a, args.b))
    bar = Bar("rendering", unit="frame")
    try:
        frames = morph_frames(G, a, b, frames=args.frames, layers=args.layers, easing=args.easing,
                              pingpong=args.pingpong, progress=bar)
    finally:
        bar.close()
    write_animation(frames, out, fps=args.fps)
    say(f"{len(frames)} frames written to {out}")
    return 0


def weights_command(args: argparse.Namespace) -> int:
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


def encoder(args: argparse.Namespace) -> int:
    """`stylebot encoder train`: train (or resume training) an encoder for a generator."""
    from engine.encoder_cmd import TrainSettings, run_train, summary

    bar = Bar("training encoder")
    try:
        report = run_train(
            model=args.model, out=Path(args.out) if args.out else None, steps=args.steps,
            settings=TrainSettings(batch_size=args.batch_size, lr=args.lr, seed=args.seed),
            save_every=args.save_every, arch=args.arch, init=args.init, restart=args.restart,
            device=args.device, progress=bar, say=say)
    finally:
        bar.close()
    say(summary(report))
    return 0
