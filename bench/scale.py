"""Scale-out throughput: engine workers behind the real Redis queue, selfies/min with 1 and N workers.

Usage (on a CUDA machine, from the repository root):

    python -m bench.scale --devices cuda:0,cuda:1 [--jobs 32] [--database postgresql] [--out DIR]

Starts a throwaway ``redis-server`` on loopback (the same helper the tests use; the binary must be on
PATH), a SQLite database and a media dir, and for each worker count (1, then all ``--devices``): that
many worker processes (``python -m bench.scale worker``, one per device; a device may repeat, to put
two workers on one GPU), then submits ``--jobs`` invert jobs through the product's RedisQueue and times
them from the first message sent to the last job stored. The workers are the product's
``engine.worker.Worker`` over ``storage.redis_queue.RedisQueue`` with the product's ``Engine``; only
the networks differ, as in ``bench.perf``: the full config-f generator with random weights, random
LPIPS/identity networks of the real shapes, and in-range targets G(w*) that are already aligned (the
worker skips MTCNN, a few ms per photo). GPU utilisation is sampled with nvidia-smi while jobs run,
and each worker logs its batches' sizes and wall times, which give its rate while it had work (a
burst's uneven tail left out).
Prints one table and writes ``scale.json`` to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import skimage.data
import torch
from PIL import Image
from sqlalchemy import select

from bench.perf import _generator, _losses, _targets
from engine.align import AlignedFace, FaceDetector, align_face
from engine.generators import LoadedGenerator, configure_cuda
from engine.images import tensor_to_pil
from engine.progress import ProgressFn, no_progress
from engine.runner import Engine, JobInput, JobOutcome
from engine.worker import Worker, WorkerSettings
from settings import QueueConfig
from storage import repo
from storage.db import make_db, make_sessionmaker, sqlite_url, upgrade
from storage.media import MediaStore
from storage.models import Job
from storage.queue import open_queue

Row = dict[str, Any]
MODEL_ID = "bench-random"


class BenchEngine(Engine):
    """The product Engine on random-weight networks of full size; photos are already aligned."""

    def __init__(self, *, device: torch.device, resolution: int, steps: int, batch_size: int,
                 batch_log: Path) -> None:
        self.batch_log = batch_log
        G = _generator(resolution, device)
        self.loaded = LoadedGenerator(G=G, name=f"random config-f {resolution}", model_id=MODEL_ID,
                                      content_hash="", is_demo=True)
        self.device, self.home = device, None
        self.perceptual, self.identity = _losses(device)
        self.detector = FaceDetector(device=str(device))
        self.invert_steps, self.edit_steps, self.compile = steps, 1, device.type == "cuda"
        self._clip_name, self._clip, self.table_samples = "demo", None, 1
        self.build_table_when_idle = False
        self._reset_state()
        photo = Image.fromarray(skimage.data.astronaut())
        self._alignment = align_face(photo, size=resolution, detector=self.detector).alignment
        self.warm_up(batch_size)  # as the product's worker does before it takes jobs
        self.wait_for_warm_up()  # ... and measured once every size is compiled

    def run_batch(self, kind: str, inputs: Sequence[JobInput], *, progress: ProgressFn = no_progress,
                  ) -> list[JobOutcome]:
        """The product's run_batch, each batch's size and wall time appended to ``batch_log``."""
        t0 = time.time()
        out = super().run_batch(kind, inputs, progress=progress)
        with self.batch_log.open("a") as f:
            f.write(json.dumps({"jobs": len(inputs), "t0": t0, "t1": time.time()}) + "\n")
        return out

    def _align(self, photo: bytes) -> AlignedFace:
        with Image.open(io.BytesIO(photo)) as im:
            return AlignedFace(image=im.convert("RGB"), alignment=self._alignment, note=None)


async def _serve_worker(args: argparse.Namespace) -> None:
    dev = torch.device(args.device)
    if dev.type == "cuda":
        configure_cuda()
    t0 = time.perf_counter()
    engine = await asyncio.to_thread(BenchEngine, device=dev, resolution=args.res, steps=args.steps,
                                     batch_size=args.batch, batch_log=Path(args.batch_log))
    print(f"[worker {args.worker_id}: networks built and warmed up in {time.perf_counter() - t0:.1f} s]",
          file=sys.stderr, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    orphan_watch = asyncio.create_task(_stop_when_orphaned(stop))
    db = make_db(args.db)
    sessions = make_sessionmaker(db)
    settings = WorkerSettings(worker_id=args.worker_id, batch_size=args.batch, batch_wait_ms=20)
    try:
        async with open_queue(QueueConfig(backend="redis", redis_url=args.redis), sessions=sessions,
                              consumer=args.worker_id) as queue:
            print("ready", flush=True)
            await Worker(engine, sessions=sessions, queue=queue, media=MediaStore(Path(args.media)),
                         settings=settings).run(stop)
    finally:
        orphan_watch.cancel()
        await db.dispose()


async def _stop_when_orphaned(stop: asyncio.Event) -> None:
    """A worker whose bench process died (killed by a time limit) stops too, not holding the GPU."""
    parent = os.getppid()
    while os.getppid() == parent:
        await asyncio.sleep(1.0)
    stop.set()


class _GpuSampler:
    """nvidia-smi utilisation.gpu (%) of every GPU, twice a second, while running."""

    def __init__(self) -> None:
        self.samples: dict[int, list[float]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> _GpuSampler:
        if shutil.which("nvidia-smi"):
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            out = subprocess.run(["nvidia-smi", "--query-gpu=index,utilization.gpu",
                                  "--format=csv,noheader,nounits"], capture_output=True, text=True)
            for line in out.stdout.splitlines():
                index, util = (v.strip() for v in line.split(","))
                self.samples.setdefault(int(index), []).append(float(util))

    def mean(self) -> dict[str, float]:
        return {f"gpu{i}": round(statistics.mean(v), 1) for i, v in sorted(self.samples.items()) if v}


def _start_workers(args: argparse.Namespace, devices: list[str], redis_url: str, db_url: str,
                   media: Path) -> list[subprocess.Popen[str]]:
    procs = []
    for i, device in enumerate(devices):
        cmd = [sys.executable, "-m", "bench.scale", "worker", "--device", device, "--redis", redis_url,
               "--db", db_url, "--media", str(media), "--worker-id", f"bench-{i}-{device}",
               "--batch-log", str(media.parent / f"batches-{len(devices)}-{i}.jsonl"),
               "--res", str(args.res), "--steps", str(args.steps), "--batch", str(args.batch)]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True))
    for proc in procs:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "ready":
            for other in procs:
                other.kill()
            raise RuntimeError(f"a worker did not start (exit code {proc.wait()})")
    return procs


async def _run(args: argparse.Namespace, devices: list[str], redis_url: str, keys: list[str],
               root: Path, postgres: str | None) -> Row:
    """One measurement on a new database: SQLite in ``root``, or one on the ``postgres`` server."""
    from redis.asyncio import Redis

    from tests.postgres_db import fresh_postgres_database

    client = Redis.from_url(redis_url)
    await client.flushdb()
    await client.aclose()
    async with contextlib.AsyncExitStack() as stack:
        if postgres:
            db_url = await stack.enter_async_context(fresh_postgres_database(postgres))
        else:
            db_url = sqlite_url(root / f"jobs-{len(devices)}.db")
        return await _measure(args, devices, redis_url, db_url, keys, root)


async def _measure(args: argparse.Namespace, devices: list[str], redis_url: str, db_url: str,
                   keys: list[str], root: Path) -> Row:
    await upgrade(db_url)
    db = make_db(db_url)
    sessions = make_sessionmaker(db)
    procs = await asyncio.to_thread(_start_workers, args, devices, redis_url, db_url, root / "media")
    try:
        async with open_queue(QueueConfig(backend="redis", redis_url=redis_url), sessions=sessions) as queue:
            async with sessions.begin() as s:
                ids = [(await repo.create_job(s, kind="invert", model=MODEL_ID,
                                              payload={"photo_key": keys[i % len(keys)]}, user_id=None,
                                              chat_id=None, reply_to={}, timeout_s=3600)).id
                       for i in range(args.jobs)]
            with _GpuSampler() as gpus:
                t0 = time.perf_counter()
                await queue.notify(ids)
                while True:
                    async with sessions() as s:
                        n_open = await repo.count_open_jobs(s)
                    if n_open == 0:
                        break
                    if any(proc.poll() is not None for proc in procs):
                        raise RuntimeError("a worker exited during the run")
                    await asyncio.sleep(0.1)
                seconds = time.perf_counter() - t0
            async with sessions() as s:
                jobs = (await s.execute(select(Job.status, Job.result, Job.batch_id))).all()
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            proc.wait(timeout=120)
        await db.dispose()
    done = [j for j in jobs if j.status == "done"]
    per_worker = [_busy(root / f"batches-{len(devices)}-{i}.jsonl") for i in range(len(devices))]
    return {"figure": f"{len(devices)} worker(s) on {','.join(devices)}", "workers": len(devices),
            "jobs": len(jobs), "done": len(done), "seconds": seconds,
            "selfies_per_min": 60 * len(done) / seconds, "batches": len({j.batch_id for j in jobs}),
            "psnr": statistics.mean(j.result["psnr"] for j in done) if done else float("nan"),
            "gpu_util_pct": gpus.mean(), "per_worker": per_worker,
            "busy_selfies_per_min": sum(w["selfies_per_min"] for w in per_worker)}


def _busy(batch_log: Path) -> Row:
    """One worker's batches: how many jobs it ran and at what rate while it had work (first batch's
    start to last batch's end), and each batch's size."""
    batches = [json.loads(line) for line in batch_log.read_text().splitlines()] if batch_log.exists() else []
    jobs = sum(b["jobs"] for b in batches)
    busy = max((b["t1"] for b in batches), default=0.0) - min((b["t0"] for b in batches), default=0.0)
    return {"jobs": jobs, "busy_s": round(busy, 1), "batch_sizes": [b["jobs"] for b in batches],
            "selfies_per_min": 60 * jobs / busy if busy > 0 else 0.0}


def _targets_to_media(args: argparse.Namespace, device: torch.device, media: MediaStore) -> list[str]:
    G = _generator(args.res, device, seed=0)
    _, images = _targets(G, list(range(1000, 1000 + args.targets)))
    keys = []
    for img in images:
        buf = io.BytesIO()
        tensor_to_pil(img.unsqueeze(0).cpu()).save(buf, format="PNG")
        keys.append(media.put(buf.getvalue(), suffix=".png"))
    del G, images
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return keys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command")
    w = sub.add_parser("worker")
    for name in ("--device", "--redis", "--db", "--media", "--worker-id", "--batch-log"):
        w.add_argument(name, required=True)
    for p in (ap, w):
        p.add_argument("--res", type=int, default=1024)
        p.add_argument("--steps", type=int, default=300)
        p.add_argument("--batch", type=int, default=16)
    ap.add_argument("--devices", default="cuda:0,cuda:1", help="one worker per entry")
    ap.add_argument("--jobs", type=int, default=32)
    ap.add_argument("--targets", type=int, default=8, help="distinct target images")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--database", choices=["sqlite", "postgresql"], default="sqlite",
                    help="postgresql: a throwaway server, as tests/servers.py starts it")
    args = ap.parse_args(argv)
    if args.command == "worker":
        asyncio.run(_serve_worker(args))
        return 0
    from tests.servers import start_postgres, start_redis

    signal.signal(signal.SIGTERM, _interrupted)  # a time limit: stop the workers on the way out
    devices = args.devices.split(",")
    report: Row = {"card": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
                   "gpus": torch.cuda.device_count(), "torch": torch.__version__,
                   "settings": {k: getattr(args, k) for k in ("res", "steps", "batch", "jobs", "database")},
                   "rows": []}
    server = start_redis()
    postgres = start_postgres() if args.database == "postgresql" else None
    try:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            keys = _targets_to_media(args, torch.device(devices[0]), MediaStore(root / "media"))
            for workers in sorted({1, len(devices)}):
                print(f"[{workers} worker(s): starting]", flush=True)
                report["rows"].append(asyncio.run(_run(args, devices[:workers], server.url, keys, root,
                                                       postgres.url if postgres else None)))
                print(_fmt(report["rows"][-1]), flush=True)
                _write(args.out, report)  # what a cut-off run measured so far
    finally:
        server.stop()
        if postgres:
            postgres.stop()
    rows = report["rows"]
    if len(rows) == 2:
        report["scaling"] = rows[1]["selfies_per_min"] / rows[0]["selfies_per_min"]
        report["scaling_busy"] = rows[1]["busy_selfies_per_min"] / rows[0]["busy_selfies_per_min"]
    _write(args.out, report)
    print(f"card: {report['card']} x{report['gpus']}, torch {report['torch']}, {report['settings']}")
    for row in rows:
        print(_fmt(row))
    if "scaling" in report:
        print(f"scaling {len(devices)} workers vs 1: {report['scaling']:.2f}x from first job sent to last "
              f"stored, {report['scaling_busy']:.2f}x in the sum of each worker's rate while it had work")
    return 0


def _interrupted(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _write(out: str, report: Row) -> None:
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "scale.json").write_text(json.dumps(report, indent=1))


def _fmt(row: Row) -> str:
    return (f"{row['figure']:36} {row['selfies_per_min']:8.1f} selfies/min  {row['done']}/{row['jobs']} done "
            f"in {row['seconds']:.1f} s, {row['batches']} batches, PSNR {row['psnr']:.2f} dB, "
            f"GPU util {row['gpu_util_pct']}; while busy: {row['busy_selfies_per_min']:.1f} selfies/min, per "
            f"worker (jobs, s, batch sizes): "
            + ", ".join(f"({w['jobs']}, {w['busy_s']}, {w['batch_sizes']})" for w in row["per_worker"]))


if __name__ == "__main__":
    raise SystemExit(main())
