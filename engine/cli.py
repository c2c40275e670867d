"""The engine's commands on the command line: parsers here (no torch), work in :mod:`engine.commands`
and :mod:`engine.edit_commands`, imported once a command runs."""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import threading
from typing import Any

from settings import REDIS_URL_PATTERN, Config, EngineConfig
from storage.specs import MORPH_FPS, MORPH_FRAMES

__all__ = ["COMMANDS", "add_commands", "demo_banner", "dispatch", "serve"]

COMMANDS = ("engine", "align", "invert", "render", "morph", "edit", "directions", "encoder", "weights")
_DEFAULTS = EngineConfig()


def _redis_url(text: str) -> str:
    if not re.fullmatch(REDIS_URL_PATTERN, text):
        raise argparse.ArgumentTypeError("expected a redis://, rediss:// or unix:// URL")
    return text


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="auto",
                   help="demo | auto (real FFHQ weights when downloaded, else demo) | a name "
                        "from `stylebot weights list` | a checkpoint file (.pkl/.pt/.safetensors)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] (default: auto)")


def _worker(sub: Any) -> None:
    p = sub.add_parser("engine", help="an engine worker: takes jobs from the queue")
    p.add_argument("--config", default=None, help="config file (default: built-in defaults)")
    p.add_argument("--worker-id", default=None, help="stable id of this worker (default host:device)")
    p.add_argument("--device", default=None, help="override [engine] device, e.g. cuda:1")
    p.add_argument("--queue", default=None, metavar="REDIS_URL", type=_redis_url,
                   help="join the worker pool on this Redis server ([queue] backend = \"redis\")")


def _images(sub: Any) -> None:
    p = sub.add_parser("align", help="detect the face in a photo and crop it FFHQ-style")
    p.add_argument("photo")
    p.add_argument("-o", "--output", required=True, help="aligned image (.png)")
    p.add_argument("--size", type=int, default=1024, help="output side in pixels (default 1024)")

    p = sub.add_parser("invert", help="align a photo and find its W+ latent")
    p.add_argument("photo")
    p.add_argument("-o", "--output", required=True, metavar="DIR",
                   help="writes latent.npy, latent.json, aligned.png, reconstruction.png, "
                        "alignment.json, report.json")
    p.add_argument("--steps", type=int, default=None,
                   help=f"optimisation steps (default {_DEFAULTS.invert_steps}, "
                        f"{_DEFAULTS.encoder_invert_steps} from an encoder)")
    p.add_argument("--optimize-noise", action="store_true", help="also fit per-layer noise")
    p.add_argument("--encoder", default=_DEFAULTS.encoder,
                   help="start from an encoder's guess: auto (the one trained for this model, if "
                        "any) | none | e4e-ffhq | a file; writes first_look.png")
    _common(p)

    p = sub.add_parser("render", help="render a latent to an image")
    p.add_argument("latent")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--noise", choices=["const", "random", "none"], default="const")
    _common(p)

    p = sub.add_parser("morph", help="animate from one latent to another")
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("-o", "--output", required=True, help="out.mp4 or out.gif")
    p.add_argument("--frames", type=int, default=MORPH_FRAMES)
    p.add_argument("--fps", type=float, default=MORPH_FPS)
    p.add_argument("--layers", choices=["all", "coarse", "middle", "fine"], default="all")
    p.add_argument("--easing", choices=["smooth", "linear", "cosine"], default="smooth")
    p.add_argument("--pingpong", action="store_true", help="go back to the start (loops)")
    _common(p)


def _edits(sub: Any) -> None:
    p = sub.add_parser("edit", help="edit a face latent with a text prompt (StyleCLIP)")
    p.add_argument("latent")
    p.add_argument("text", help='what the face should become, e.g. "smiling face"')
    p.add_argument("-o", "--output", required=True, help="edited image (.png)")
    p.add_argument("--method", choices=["global", "optimize"], default="global",
                   help="global: StyleCLIP global directions (fast, default); "
                        "optimize: latent optimisation (slower, stronger)")
    p.add_argument("--strength", type=float, default=None,
                   help="global: alpha (negative reverses the edit); optimize: scales the edit by "
                        "dividing the L2 weight (default: the engine's, as in the chat)")
    p.add_argument("--beta", type=float, default=None,
                   help="global: channels less relevant than beta are left alone")
    p.add_argument("--steps", type=int, default=None,
                   help=f"optimize: steps (default {_DEFAULTS.edit_steps})")
    p.add_argument("--neutral", default=None, help='the neutral prompt (default: "face")')
    p.add_argument("--paste-into", metavar="PHOTO", default=None,
                   help="paste the edit back into the original photo (needs the alignment.json "
                        "that `invert` wrote beside the latent); the face alone goes to "
                        "OUTPUT-face.png")
    p.add_argument("--clip", default="auto", help="auto | demo | clip-vit-b32 | a CLIP file")
    p.add_argument("--samples", type=int, default=_DEFAULTS.direction_samples,
                   help="global: samples per channel if the direction table must be built")
    _common(p)

    p = sub.add_parser("directions", help="build or list StyleCLIP channel-relevance tables")
    dsub = p.add_subparsers(dest="directions_command", required=True, metavar="ACTION")
    q = dsub.add_parser("build", help="build the table for a generator and CLIP model")
    q.add_argument("--samples", type=int, default=_DEFAULTS.direction_samples,
                   help="sample images per channel")
    q.add_argument("--batch-size", type=int, default=None,
                   help="style channels rendered at once (default: the engine's)")
    q.add_argument("--rebuild", action="store_true", help="discard a cached table")
    q.add_argument("--clip", default="auto")
    _common(q)
    dsub.add_parser("list", help="cached tables")


def _encoder(sub: Any) -> None:
    p = sub.add_parser("encoder", help="train an encoder (a first latent in one forward pass)")
    esub = p.add_subparsers(dest="encoder_command", required=True, metavar="ACTION")
    q = esub.add_parser("train", help="train on the generator's own samples (resumable)")
    q.add_argument("-o", "--out", default=None,
                   help="the encoder (.safetensors; default: where the engine looks for this "
                        "model's encoder); its training state goes beside it, in "
                        "*.train.safetensors, and a second run with the same --out resumes")
    q.add_argument("--steps", type=int, required=True, help="train up to this step")
    q.add_argument("--batch-size", type=int, default=8)
    q.add_argument("--lr", type=float, default=1e-4)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--save-every", type=int, default=500, help="steps between saves (default 500)")
    q.add_argument("--arch", choices=["auto", "e4e", "small"], default="auto",
                   help="e4e: IR-SE 50 at 256 px; small: CPU-sized; auto: small for the demo model")
    q.add_argument("--init", default=None, help="start from this encoder: e4e-ffhq or a file")
    q.add_argument("--restart", action="store_true", help="ignore a saved training state")
    _common(q)


def _weights(sub: Any) -> None:
    p = sub.add_parser("weights", help="list, fetch, verify or convert model weights")
    wsub = p.add_subparsers(dest="weights_command", required=True, metavar="ACTION")
    wsub.add_parser("list", help="what the cache holds and what can be fetched")
    q = wsub.add_parser("fetch", help="download weights (resumable, hash-checked)")
    q.add_argument("names", nargs="+")
    q.add_argument("--force", action="store_true")
    q = wsub.add_parser("verify", help="check the hashes of cached weights")
    q.add_argument("names", nargs="*")
    q = wsub.add_parser("convert", help="convert a .pkl/.pt generator to our .safetensors")
    q.add_argument("source")
    q.add_argument("-o", "--output", required=True)


def add_commands(sub: Any) -> None:
    """The engine's subcommands, on the entry point's subparsers."""
    _worker(sub)
    _images(sub)
    _edits(sub)
    _encoder(sub)
    _weights(sub)


def dispatch(args: argparse.Namespace) -> int:
    """Run one of the file commands (everything but `engine`); imports torch."""
    if args.command in ("edit", "directions"):
        from engine import edit_commands

        return edit_commands.edit(args) if args.command == "edit" else edit_commands.directions(args)
    from engine import commands

    run = {"align": commands.align, "invert": commands.invert, "render": commands.render,
           "morph": commands.morph, "weights": commands.weights_command,
           "encoder": commands.encoder}[args.command]
    return run(args)


def serve(args: argparse.Namespace, config: Config) -> int:
    """`stylebot engine`: the worker process, until SIGINT/SIGTERM."""
    import asyncio

    from engine.worker import serve as serve_jobs  # imports torch

    asyncio.run(serve_jobs(config, device=args.device, worker_id=args.worker_id, queue_url=args.queue))
    if any(t.daemon and t.is_alive() for t in threading.enumerate()):
        # The GPU warm-up thread, still compiling, would abort the interpreter's teardown (exit -6,
        # "terminate called without an active exception"); every job and lease is settled by now.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


def demo_banner(config: Config) -> str | None:
    """What the chat shows while the engine runs the demo model (``demo``, or ``auto`` without the
    FFHQ weights); None for a real model. Reads the weights cache only (no torch)."""
    from engine import weights

    real, model = weights.DEFAULT_GENERATOR, config.engine.model
    if model == "auto":
        model = real if weights.find(real) is not None else "demo"
    if model != "demo":
        return None
    return ("Demo model: random weights, not a face model. For real faces run "
            f"`stylebot weights fetch {real} vgg16-imagenet clip-vit-b32`, then restart "
            "`make run`. Everything else (commands, queue, consent) works the same.")
