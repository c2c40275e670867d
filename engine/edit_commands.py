"""The engine's StyleCLIP commands (`edit`, `directions`): I/O around :mod:`engine.operations`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from engine.align import Alignment, load_photo
from engine.clip_model import ClipModel, load_clip
from engine.console import Bar, load_model, output_path, say
from engine.directions import CHUNK_SIZE, ChannelTable, load_or_build_table
from engine.errors import EngineError
from engine.generators import LoadedGenerator
from engine.identity import load_identity
from engine.images import tensor_to_pil
from engine.latents import load_latent
from engine.operations import global_edit, neutral_prompt, optimize_edit
from engine.pasteback import paste_back
from engine.weights import stylebot_home

__all__ = ["directions", "edit"]


def _clip(args: argparse.Namespace, loaded: LoadedGenerator) -> ClipModel:
    clip_model = load_clip(args.clip, device=loaded.G.w_avg.device)
    say(f"CLIP: {clip_model.name}")
    return clip_model


def _table_for(args: argparse.Namespace, loaded: LoadedGenerator, clip_model: ClipModel,
               *, samples: int, batch_size: int | None = None, rebuild: bool = False) -> ChannelTable:
    bar = Bar("direction table", unit="channel")
    try:
        table, built = load_or_build_table(
            loaded.G, clip_model.encode_images, model_hash=loaded.content_hash,
            clip_key=clip_model.model_key, home=stylebot_home(), samples=samples,
            batch_size=batch_size or CHUNK_SIZE, rebuild=rebuild, progress=bar)
    finally:
        bar.close()
    if built:
        say(f"built the channel table ({sum(table.sizes)} channels, {samples} samples)")
    return table


def edit(args: argparse.Namespace) -> int:
    out = output_path(args.output)
    text = args.text.strip()
    if not text:
        raise EngineError("say what the edit should do, e.g. \"smiling face\"")
    latent_path = Path(args.latent)
    alignment = photo = None
    if args.paste_into:
        align_file = latent_path.with_name("alignment.json")
        if not align_file.exists():
            raise EngineError(f"--paste-into needs {align_file} (written by `stylebot invert`)")
        alignment = Alignment.from_json(json.loads(align_file.read_text()))
        photo = load_photo(args.paste_into)
        if photo.size != tuple(alignment.photo_size):
            raise EngineError("that photo is not the one this latent was inverted from")
    loaded = load_model(args)
    G = loaded.G
    ws = load_latent(latent_path, model_id=loaded.model_id, num_ws=G.num_ws, w_dim=G.w_dim)
    ws = ws.unsqueeze(0).to(G.w_avg.device)
    clip_model = _clip(args, loaded)
    if args.method == "global":
        table = _table_for(args, loaded, clip_model, samples=args.samples)
        edit = global_edit(G, ws, table, clip_model, text, neutral=args.neutral or neutral_prompt(loaded),
                           strength=args.strength, beta=args.beta)
        images = edit.images
        say(f"global edit: {edit.channels} style channels, strength {edit.strength:g}, beta {edit.beta:g}")
    else:
        if args.strength is not None and args.strength <= 0:
            raise EngineError("--strength must be positive for --method optimize")
        identity = load_identity(device=G.w_avg.device)  # None unless facenet weights are cached
        bar = Bar("editing")
        try:
            result = optimize_edit(G, ws, [text], clip_model, strengths=[args.strength], steps=args.steps,
                                   identity=identity, progress=bar)
        finally:
            bar.close()
        images = result.images
    face = tensor_to_pil(images[0])
    if alignment is not None and photo is not None:
        face_out = out.with_name(f"{out.stem}-face{out.suffix}")
        face.save(face_out)
        paste_back(photo, face, alignment).save(out)
        say(f"edited face: {face_out}; pasted into the photo: {out}")
    else:
        face.save(out)
        say(f"edited face: {out}")
    return 0


def directions(args: argparse.Namespace) -> int:
    home = stylebot_home()
    if args.directions_command == "list":
        tables = sorted((home / "directions").glob("*.safetensors"))
        for path in tables:
            print(path)
        if not tables:
            say(f"no tables yet in {home / 'directions'}")
        return 0
    if args.samples < 1:
        raise EngineError("--samples must be at least 1")
    loaded = load_model(args)
    clip_model = _clip(args, loaded)
    _table_for(args, loaded, clip_model, samples=args.samples, batch_size=args.batch_size,
               rebuild=args.rebuild)
    return 0
