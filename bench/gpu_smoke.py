"""`make gpu-smoke`: every product operation on CUDA, through the real worker process and Engine.

Run it on a GPU machine after every change to engine/ (CI has no GPU). It writes a full-size random
generator with NVIDIA's own code (bench/official_snapshot.py) and full-size CLIP / VGG16 / FaceNet
stand-ins in their upstream formats (bench/stand_ins.py) into a fresh STYLEBOT_HOME, as
`weights fetch` would, then starts `stylebot engine` with the default config (batch size 16,
compiled) and sends it jobs through the database: selfies (one alone, four together, uncompiled
while the worker warms up and compiled after), global and optimisation edits (alone and four
together, each at its own strength), morphs (MP4, GIF), a mix. In this process: a chunk of the
direction-table build, and a batch split after a real CUDA out-of-memory. It prints the commit, a
line per check as it finishes, and a table last; it exits 1 if any check failed.

Usage: python -m bench.gpu_smoke --official-code DIR [--work DIR] [--out DIR] [--deadline-s 540]
  --official-code: a clone of NVlabs/stylegan2-ada-pytorch (see bench/official_snapshot.py)
  --work: reused between runs (weights stay; the database and media are new each run)
  --worker-code DIR: run the worker from another checkout (e.g. an old commit, to see it fail)
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import skimage.data
from PIL import Image

from storage import repo
from storage.db import make_db, make_sessionmaker, upgrade
from storage.media import MediaStore
from storage.models import Job, utcnow

_STARTED = time.monotonic()
_ALL_CHECKS = ("invert", "global-edit", "optimize-edit", "morph", "mix", "compiled", "table-chunk",
               "oom-split")


@dataclass
class Check:
    name: str
    ok: bool
    seconds: float
    detail: str


@dataclass
class Smoke:
    home: Path
    out: Path
    checks: list[Check] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)

    def record(self, name: str, ok: bool, seconds: float, detail: str) -> None:
        self.checks.append(Check(name, ok, seconds, detail))
        line = f"{'PASS' if ok else 'FAIL'} {name} ({seconds:.1f} s): {detail}"
        print(line, flush=True)
        with (self.out / "checks.txt").open("a") as f:  # kept if the run is cut off
            f.write(line + "\n")


def _commit() -> str:
    if commit := os.environ.get("STYLEBOT_COMMIT"):  # the GPU machine's tree may lack our .git
        return commit
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True,
                             text=True, check=True, cwd=Path(__file__).parent)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _prepare_weights(home: Path, official_code: Path, resolution: int) -> float:
    from bench.official_snapshot import write_snapshot
    from bench.stand_ins import write_weights_cache

    weights = home / "weights"
    start = time.perf_counter()
    if not (weights / "ffhq.pkl").exists():
        weights.mkdir(parents=True, exist_ok=True)
        write_snapshot(official_code, weights / "ffhq.pkl.tmp", resolution=resolution)
        (weights / "ffhq.pkl.tmp").replace(weights / "ffhq.pkl")
        write_weights_cache(weights)
    return time.perf_counter() - start


def _photos() -> list[bytes]:
    """The astronaut photo, turned a little each time: one real face, different pixels."""
    photo = Image.fromarray(skimage.data.astronaut())
    out = []
    for angle in (0, 4, -4, 8, -8, 12, -12, 2, -2, 6):
        buf = io.BytesIO()
        photo.rotate(angle).save(buf, format="JPEG", quality=92)
        out.append(buf.getvalue())
    return out


class Jobs:
    """Sends jobs as the bot's service does (a row each) and waits for them."""

    def __init__(self, url: str, media: MediaStore) -> None:
        self.db = make_db(url)
        self.sessions = make_sessionmaker(self.db)
        self.media = media
        self.user_id = 0
        self.alive: Callable[[], bool] = lambda: True  # the worker still runs

    async def start(self) -> None:
        async with self.sessions.begin() as s:
            user = await repo.get_or_create_user(s, platform="smoke", platform_user_id="1",
                                                 username="smoke")
            self.user_id = user.id

    async def submit(self, kind: str, payloads: list[dict[str, Any]]) -> list[str]:
        async with self.sessions.begin() as s:
            jobs = [await repo.create_job(s, kind=kind, model="auto", payload=p, user_id=self.user_id,
                                          chat_id=None, reply_to={}) for p in payloads]
            return [j.id for j in jobs]

    async def selfies(self, photos: list[bytes]) -> list[str]:
        keys = [self.media.put(p, suffix=".jpg") for p in photos]
        return await self.submit("invert", [{"photo_key": k, "label": f"p{i}"} for i, k in enumerate(keys)])

    async def wait(self, ids: list[str], *, timeout: float) -> list[Job]:
        deadline = time.monotonic() + timeout
        while True:
            async with self.sessions() as s:
                jobs = [await repo.get_job(s, i) for i in ids]
            if all(j is not None and j.status in ("done", "failed") for j in jobs):
                return [j for j in jobs if j is not None]
            states = [None if j is None else j.status for j in jobs]
            if not self.alive():
                raise RuntimeError(f"the worker exited; jobs: {states}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"jobs not finished after {timeout:.0f} s: {states}")
            await asyncio.sleep(0.2)


def _done(jobs: list[Job], *files: str) -> tuple[bool, str]:
    """All done, each with its files; else what went wrong."""
    bad = [f"{j.kind} {j.status}: {j.error}" for j in jobs if j.status != "done"]
    if bad:
        return False, "; ".join(bad)
    missing = [f for j in jobs for f in files if not (j.result or {}).get(f)]
    return (not missing, f"missing {missing}" if missing else "")


class Worker:
    """`stylebot engine` as a child process, its log in a file."""

    def __init__(self, home: Path, config: Path, log: Path, code: Path | None) -> None:
        env = {**os.environ, "STYLEBOT_HOME": str(home), "PYTHONUNBUFFERED": "1"}
        if code is not None:
            env["PYTHONPATH"] = os.pathsep.join([str(code), env.get("PYTHONPATH", "")])
        self.log = log
        self.started = utcnow()
        with log.open("wb") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "cli", "engine", "--config", str(config),
                                          "--worker-id", "smoke"], env=env, stdout=out, stderr=out,
                                         cwd=code or Path.cwd())

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    async def wait_for(self, pattern: str, *, timeout: float) -> re.Match[str] | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if m := re.search(pattern, self.text()):
                return m
            if self.proc.poll() is not None:
                return None
            await asyncio.sleep(0.5)
        return None

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()


async def _timed(smoke: Smoke, name: str, run: Callable[[], Awaitable[tuple[bool, str]]]) -> None:
    start = time.perf_counter()
    try:
        ok, detail = await run()
    except Exception as exc:  # a check that raises fails; the others still run
        ok, detail = False, f"{type(exc).__name__}: {exc}"
    smoke.record(name, ok, time.perf_counter() - start, detail)


async def _through_the_worker(smoke: Smoke, args: argparse.Namespace) -> None:
    home = smoke.home
    data = home / "data"
    shutil.rmtree(data, ignore_errors=True)
    data.mkdir(parents=True)
    url = f"sqlite+aiosqlite:///{data / 'stylebot.db'}"
    await upgrade(url)
    config = home / "smoke.toml"
    steps = "" if args.steps is None else f"invert_steps = {args.steps}\nedit_steps = {args.steps}\n"
    idle = "" if args.worker_code else "build_directions = false\n"  # a key older code lacks
    config.write_text(f'[engine]\nmodel = "auto"\ndevice = "{args.device}"\nclip = "auto"\n'
                      f'batch_size = {args.batch_size}\ncompile = {"true" if args.compile else "false"}\n'
                      f'{idle}{steps}')
    _write_random_table(home)
    jobs = Jobs(url, MediaStore(data / "media"))
    await jobs.start()
    photos = _photos()
    first = await jobs.selfies(photos[:1])  # queued before the worker starts: its first claim
    worker = Worker(home, config, args.out / "worker.log", args.worker_code)
    jobs.alive = lambda: worker.proc.poll() is None
    checks = set(args.checks)
    faces: list[int] = []
    try:
        async def first_selfie() -> tuple[bool, str]:
            (job,) = await jobs.wait(first, timeout=args.deadline_s)
            ok, detail = _done([job], "panel_key")
            if job.started_at is not None and job.finished_at is not None:
                smoke.figures["first_claim_s"] = round((job.started_at - worker.started).total_seconds(), 1)
                smoke.figures["first_selfie_s"] = round((job.finished_at - worker.started).total_seconds(), 1)
                detail = (f"worker start to first job claimed {smoke.figures['first_claim_s']} s, to its "
                          f"result {smoke.figures['first_selfie_s']} s {detail}")
            if ok:
                faces.append(int((job.result or {})["face_id"]))
            return ok, detail

        await _timed(smoke, "invert B=1 (worker's first job)", first_selfie)
        if "invert" in checks:
            async def four_selfies() -> tuple[bool, str]:
                warming = args.device == "cuda" and args.batch_size >= 4
                if warming and not await worker.wait_for(r"batch size 4 ready in", timeout=180):
                    return False, "batch size 4 was not warmed up in 180 s"
                done = await jobs.wait(await jobs.selfies(photos[1:5]), timeout=300)
                faces.extend(int((j.result or {}).get("face_id", 0)) for j in done)
                sizes = sorted({(j.result or {}).get("batch") for j in done}, key=str)
                ok, detail = _done(done, "panel_key")
                return ok, f"batch sizes {sizes} {detail}"

            await _timed(smoke, "invert B=4 uncompiled", four_selfies)
        face = faces[0] if faces else 0
        if "global-edit" in checks:
            await _timed(smoke, "global edit B=1 then B=4",
                         lambda: _edits(jobs, face, "global", [4.0], [2, -3, 6, 1]))
        if "optimize-edit" in checks:
            await _timed(smoke, "optimisation edit B=1 then B=4", lambda: _edits(
                jobs, face, "optimize", [1.0], [0.5, 1, 2, 4]))
        if "morph" in checks and len(faces) > 1:
            async def morphs() -> tuple[bool, str]:
                ids = await jobs.submit("morph", [{"a_id": faces[0], "b_id": faces[1], "frames": 16,
                                                   "format": fmt} for fmt in ("mp4", "gif")])
                done = await jobs.wait(ids, timeout=300)
                return _done(done, "media_key")

            await _timed(smoke, "morph MP4 and GIF", morphs)
        if "mix" in checks and len(faces) > 1:
            async def mix() -> tuple[bool, str]:
                ids = await jobs.submit("mix", [{"a_id": faces[0], "b_id": faces[1], "layers": "coarse"}])
                return _done(await jobs.wait(ids, timeout=120), "media_key")

            await _timed(smoke, "mix", mix)
        if "compiled" in checks and args.compile:
            async def compiled() -> tuple[bool, str]:
                left = args.deadline_s - (time.monotonic() - _STARTED)
                m = await worker.wait_for(r"warm-up finished in (\d+) s", timeout=max(left, 1))
                if m is None:
                    ready = re.findall(r"batch size (\d+) ready compiled in (\d+) s", worker.text())
                    return False, f"warm-up not finished by the deadline; compiled so far: {ready}"
                smoke.figures["warm_up_s"] = int(m.group(1))
                smoke.figures["compiled_sizes_s"] = re.findall(r"batch size (\d+) ready compiled in (\d+) s",
                                                               worker.text())
                one = await jobs.wait(await jobs.selfies(photos[5:6]), timeout=120)
                four = await jobs.wait(await jobs.selfies(photos[6:10]), timeout=120)
                ok, detail = _done(one + four, "panel_key")
                flags = {(j.result or {}).get("compiled") for j in one + four}
                took = [(j[0].result or {}).get("seconds") for j in (one, four)]
                return ok and flags == {True}, (f"whole warm-up {m.group(1)} s, then B=1 {took[0]} s, "
                                                f"B=4 {took[1]} s, compiled {flags} {detail}")

            await _timed(smoke, f"warm-up at batch size {args.batch_size}, then compiled B=1 and B=4",
                         compiled)
    finally:
        code = worker.stop()
        smoke.record("worker stops on SIGTERM", code == 0, 0.0, f"exit code {code}")
        errors = [line for line in worker.text().splitlines() if "Traceback" in line or " ERROR " in line]
        smoke.record("worker log without errors", not errors, 0.0, "; ".join(errors[:3]) or "clean")
        await jobs.db.dispose()


async def _edits(jobs: Jobs, face: int, method: str, single: list[float],
                 four: list[float]) -> tuple[bool, str]:
    details = []
    for strengths in (single, four):
        ids = await jobs.submit("edit", [{"face_id": face, "text": "a smiling face", "method": method,
                                          "strength": s} for s in strengths])
        done = await jobs.wait(ids, timeout=300)
        ok, detail = _done(done, "face_key", "pasted_key")
        if not ok:
            return False, detail
        took = max((j.finished_at - j.started_at).total_seconds() for j in done
                   if j.finished_at and j.started_at)
        details.append(f"{len(done)} in {took:.1f} s")
        if len({(j.result or {}).get("face_key") for j in done}) != len(done):
            return False, "two edits at different strengths gave the same picture"
        if {(j.result or {}).get("method") for j in done} != {method}:
            return False, f"ran as {[(j.result or {}).get('method') for j in done]}"
    return True, ", ".join(details)


def _write_random_table(home: Path) -> None:
    """A direction table of the right shape for the snapshot and CLIP stand-ins (random
    directions: the global edit's CUDA path is what is checked, not what it means)."""
    import torch

    from engine.checkpoints import build_generator, content_hash, load_checkpoint
    from engine.clip_model import load_clip
    from engine.directions import ChannelTable, _conv_layers, style_stats, table_path

    G = build_generator(load_checkpoint(home / "weights" / "ffhq.pkl"))
    clip_model = load_clip("auto", home=home)
    layers = _conv_layers(G)
    _, std = style_stats(G, samples=512)
    sizes = [std[n].numel() for n in layers]
    directions = torch.nn.functional.normalize(torch.randn(sum(sizes), clip_model.embed_dim), dim=-1)
    table = ChannelTable(layers=layers, sizes=sizes, directions=directions,
                         style_std=torch.cat([std[n] for n in layers]), model_hash=content_hash(G),
                         clip_key=clip_model.model_key, samples=1)
    table.save(table_path(home, model_hash=content_hash(G), clip_key=clip_model.model_key))


def _in_process(smoke: Smoke, args: argparse.Namespace) -> None:
    import logging

    import torch

    from engine.directions import TableBuild
    from engine.invert import DEFAULT_STEPS
    from engine.runner import Engine, JobInput
    from storage.specs import InvertSpec

    engine = Engine(model="auto", device=args.device, home=smoke.home, clip="auto", compile=False,
                    build_table_when_idle=False, invert_steps=args.steps or DEFAULT_STEPS)
    if "table-chunk" in args.checks:
        start = time.perf_counter()
        build = TableBuild(engine.loaded.G, engine.clip.encode_images, model_hash="smoke", clip_key="smoke",
                           samples=32)
        for _ in range(3):
            build.step()
        rows = torch.cat([torch.cat(p) for p in build._parts.values() if p])
        norms = rows.norm(dim=-1)
        ok = build.done == 3 and bool(torch.isfinite(rows).all()) and bool(((norms - 1).abs() < 1e-3).all())
        seconds = time.perf_counter() - start
        smoke.record("direction-table chunks (3 of 32 samples)", ok, seconds,
                     f"{build.done} channels of {build.total}; {seconds / 3:.2f} s a chunk with the set-up")
    if "oom-split" in args.checks and args.device == "cuda":
        photos = _photos()[:4]
        inputs = [JobInput(job_id=f"oom{i}", spec=InvertSpec(photo_key=""), photo=p)
                  for i, p in enumerate(photos)]
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        engine.run_batch("invert", inputs[:1])
        one = torch.cuda.max_memory_allocated() - base
        torch.cuda.empty_cache()
        free, _ = torch.cuda.mem_get_info()
        blocker = torch.empty(max(0, free - int(1.6 * one)), dtype=torch.uint8, device="cuda")
        records: list[str] = []

        class Grab(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                records.append(record.getMessage())

        logging.getLogger("stylebot.engine").addHandler(Grab())
        start = time.perf_counter()
        try:
            out = engine.run_batch("invert", inputs)
        finally:
            del blocker
            torch.cuda.empty_cache()
        split = any("out of GPU memory with a batch of 4" in r for r in records)
        ok = split and all(o.error is None for o in out)
        smoke.record("out-of-memory batch of 4 split and retried", ok, time.perf_counter() - start,
                     f"one selfie peaks at {one / 2**30:.2f} GiB; left {1.6 * one / 2**30:.2f} GiB free; "
                     f"split: {split}; errors: {[o.error for o in out if o.error]}")
    engine.close()
    del engine
    torch.cuda.empty_cache()  # the worker process comes next


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--official-code", type=Path, required=True)
    p.add_argument("--work", type=Path, default=Path(".smoke-home"))
    p.add_argument("--out", type=Path, default=Path("bench/results/smoke"))
    p.add_argument("--worker-code", type=Path, default=None)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--checks", default=",".join(_ALL_CHECKS), type=lambda s: s.split(","))
    p.add_argument("--deadline-s", type=float, default=540.0,
                   help="stop waiting for the warm-up this long after the start")
    p.add_argument("--resolution", type=int, default=1024)
    p.add_argument("--device", default="cuda", help="cpu: a dry run of the smoke itself")
    p.add_argument("--steps", type=int, default=None, help="inversion and edit steps (default: the config's)")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    import torch

    card = torch.cuda.get_device_name() if args.device == "cuda" else "the CPU"
    print(f"gpu smoke at commit {_commit()} on {card} (torch {torch.__version__})", flush=True)
    home = args.work.resolve()
    smoke = Smoke(home, args.out)
    took = _prepare_weights(home, args.official_code.resolve(), args.resolution)
    smoke.record("weights written", True, took,
                 f"NVIDIA snapshot {args.resolution} px, CLIP/VGG16/FaceNet stand-ins in {home / 'weights'}")
    if args.worker_code is None and {"table-chunk", "oom-split"} & set(args.checks):
        try:  # first: the worker's warm-up may then run up to the deadline
            _in_process(smoke, args)
        except Exception as exc:
            smoke.record("in-process checks", False, 0.0, f"{type(exc).__name__}: {exc}")
    asyncio.run(_through_the_worker(smoke, args))
    failed = [c for c in smoke.checks if not c.ok]
    print(f"\n{'check':<62} {'result':<6} seconds")
    for c in smoke.checks:
        print(f"{c.name:<62} {'PASS' if c.ok else 'FAIL':<6} {c.seconds:7.1f}")
    print(f"{len(smoke.checks) - len(failed)} of {len(smoke.checks)} passed in "
          f"{time.monotonic() - _STARTED:.0f} s; figures: {json.dumps(smoke.figures)}")
    (args.out / "smoke.json").write_text(json.dumps({
        "commit": _commit(), "checks": [c.__dict__ for c in smoke.checks], "figures": smoke.figures},
        indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
