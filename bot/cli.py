"""The ``stylebot`` command line. Parsing only: engine work is imported lazily per command,
so ``stylebot --help`` and the bot process never import torch."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bot.config import Config

__all__ = ["build_parser", "demo_banner", "main", "run"]


def _redis_url(text: str) -> str:
    import re

    from bot.config import REDIS_URL_PATTERN

    if not re.fullmatch(REDIS_URL_PATTERN, text):
        raise argparse.ArgumentTypeError("expected a redis://, rediss:// or unix:// URL")
    return text


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="auto",
                   help="demo | auto (real FFHQ weights when downloaded, else demo) | a name "
                        "from `stylebot weights list` | a checkpoint file (.pkl/.pt/.safetensors)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] (default: auto)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stylebot", description="Face editing with StyleGAN2: align, invert, render, morph, edit.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="the bot: service, engine process and chat adapters")
    p.add_argument("--config", default=None, help="config file (default: built-in defaults)")

    p = sub.add_parser("engine", help="an engine worker: takes jobs from the queue")
    p.add_argument("--config", default=None, help="config file (default: built-in defaults)")
    p.add_argument("--worker-id", default=None, help="stable id of this worker (default host:device)")
    p.add_argument("--device", default=None, help="override [engine] device, e.g. cuda:1")
    p.add_argument("--queue", default=None, metavar="REDIS_URL", type=_redis_url,
                   help="join the worker pool on this Redis server ([queue] backend = \"redis\")")

    p = sub.add_parser("align", help="detect the face in a photo and crop it FFHQ-style")
    p.add_argument("photo")
    p.add_argument("-o", "--output", required=True, help="aligned image (.png)")
    p.add_argument("--size", type=int, default=1024, help="output side in pixels (default 1024)")

    p = sub.add_parser("invert", help="align a photo and find its W+ latent")
    p.add_argument("photo")
    p.add_argument("-o", "--output", required=True, metavar="DIR",
                   help="writes latent.npy, latent.json, aligned.png, reconstruction.png, "
                        "alignment.json, report.json")
    p.add_argument("--steps", type=int, default=None, help="optimisation steps (default 300)")
    p.add_argument("--optimize-noise", action="store_true", help="also fit per-layer noise")
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
    p.add_argument("--frames", type=int, default=32)
    p.add_argument("--fps", type=float, default=24.0)
    p.add_argument("--layers", choices=["all", "coarse", "middle", "fine"], default="all")
    p.add_argument("--easing", choices=["smooth", "linear", "cosine"], default="smooth")
    p.add_argument("--pingpong", action="store_true", help="go back to the start (loops)")
    _common(p)

    p = sub.add_parser("edit", help="edit a face latent with a text prompt (StyleCLIP)")
    p.add_argument("latent")
    p.add_argument("text", help='what the face should become, e.g. "smiling face"')
    p.add_argument("-o", "--output", required=True, help="edited image (.png)")
    p.add_argument("--method", choices=["global", "optimize"], default="global",
                   help="global: StyleCLIP global directions (fast, default); "
                        "optimize: latent optimisation (slower, stronger)")
    p.add_argument("--strength", type=float, default=None,
                   help="global: alpha (default 4; negative reverses the edit); "
                        "optimize: scales the edit by dividing the L2 weight (default 1)")
    p.add_argument("--beta", type=float, default=0.1,
                   help="global: channels less relevant than beta are left alone (default 0.1)")
    p.add_argument("--steps", type=int, default=None, help="optimize: steps (default 100)")
    p.add_argument("--neutral", default=None, help='the neutral prompt (default: "face")')
    p.add_argument("--paste-into", metavar="PHOTO", default=None,
                   help="paste the edit back into the original photo (needs the alignment.json "
                        "that `invert` wrote beside the latent); the face alone goes to "
                        "OUTPUT-face.png")
    p.add_argument("--clip", default="auto", help="auto | demo | clip-vit-b32 | a CLIP file")
    p.add_argument("--samples", type=int, default=32,
                   help="global: samples per channel if the direction table must be built")
    _common(p)

    p = sub.add_parser("directions", help="build or list StyleCLIP channel-relevance tables")
    dsub = p.add_subparsers(dest="directions_command", required=True, metavar="ACTION")
    q = dsub.add_parser("build", help="build the table for a generator and CLIP model")
    q.add_argument("--samples", type=int, default=32, help="sample images per channel")
    q.add_argument("--batch-size", type=int, default=64)
    q.add_argument("--rebuild", action="store_true", help="discard a cached table")
    q.add_argument("--clip", default="auto")
    _common(q)
    dsub.add_parser("list", help="cached tables")

    p = sub.add_parser("encoder", help="train an encoder (a first latent in one forward pass)")
    esub = p.add_subparsers(dest="encoder_command", required=True, metavar="ACTION")
    q = esub.add_parser("train", help="train on the generator's own samples (resumable)")
    q.add_argument("-o", "--out", required=True,
                   help="the encoder (.safetensors); its training state goes beside it, in "
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
    return parser


def demo_banner(config: Config) -> str | None:
    """The web chat's banner when the engine runs the demo model (``demo``, or ``auto`` without
    FFHQ). Asked here, where the CLI may import the engine lazily, not in the bot's adapters."""
    from engine import weights  # stdlib only (no torch): where the weights cache is

    real, model = weights.DEFAULT_GENERATOR, config.engine.model
    if model == "auto":
        model = real if weights.find(real) is not None else "demo"
    if model != "demo":
        return None
    return ("Demo model: random weights, not a face model. For real faces run "
            f"`stylebot weights fetch {real} vgg16-imagenet clip-vit-b32`, then restart "
            "`make run`. Everything else (commands, queue, consent) works the same.")


def _serve(args: argparse.Namespace) -> int:
    """`run` and `engine`: long-running processes configured by the config file."""
    import asyncio
    import logging
    from pathlib import Path

    from bot.config import load_config

    config_path = Path(args.config) if args.config else None
    config = load_config(config_path)
    # Our own loggers follow [bot] log_level; libraries stop at INFO: their DEBUG lines carry chat
    # messages, SQL parameters (names, face geometry) and request URLs with tokens in them.
    level = logging.getLevelNamesMapping()[config.bot.log_level]
    logging.basicConfig(level=max(level, logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("stylebot").setLevel(level)
    if config.old_data_dir is not None:  # before anything opens the database
        from bot.data_dir import move_old_data

        move_old_data(config.old_data_dir, config.data_dir)
    if args.command == "run":
        from bot.app import configured_adapters
        from bot.app import run as run_bot

        adapters = configured_adapters(config, banner=demo_banner(config))
        return asyncio.run(run_bot(config, config_path=config_path, adapters=adapters))
    from engine.worker import serve  # the engine process: imports torch

    e, q = config.engine, config.queue
    backend, redis_url = ("redis", args.queue) if args.queue else (q.backend, q.redis_url)
    asyncio.run(serve(storage_url=config.storage_url, media_dir=str(config.media_dir),
                      model=e.model, device=args.device or e.device, batch_size=e.batch_size,
                      batch_wait_ms=e.batch_wait_ms, invert_steps=e.invert_steps,
                      edit_steps=e.edit_steps, compile=e.compile, clip=e.clip,
                      direction_samples=e.direction_samples, build_directions=e.build_directions,
                      worker_id=args.worker_id,
                      queue=backend, redis_url=redis_url, lease_s=q.lease_s,
                      redeliver_after_s=q.redeliver_after_s))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command in ("run", "engine"):
            return _serve(args)
        from bot import cli_engine  # imports torch: only now that a command needs it

        return cli_engine.dispatch(args)
    except KeyboardInterrupt:
        print("stylebot: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # engine errors are user mistakes: one line, no traceback
        from bot.config import ConfigError
        from engine.errors import EngineError
        from storage.queue import QueueUnavailable

        if isinstance(exc, EngineError | ConfigError):
            print(f"stylebot: error: {exc.message}", file=sys.stderr)
            return 2
        if isinstance(exc, QueueUnavailable):
            print(f"stylebot: error: {exc.message}", file=sys.stderr)
            return 1
        if isinstance(exc, OSError) and exc.filename is not None:
            print(f"stylebot: error: {exc.strerror}: {exc.filename}", file=sys.stderr)
            return 2
        raise


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())
