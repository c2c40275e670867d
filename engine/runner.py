"""The engine's job handlers: models loaded once, a batch of same-kind jobs in, outcomes out.

No database here: the worker (:mod:`engine.worker`) fetches each job's inputs and stores the
outcomes. One bad job fails alone: inputs are checked one by one before the batched GPU work, and
a failing batch is split and retried (also on CUDA out-of-memory).
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from engine.align import AlignedFace, Alignment, FaceDetector, align_face, load_photo
from engine.clip_model import ClipModel, load_clip
from engine.directions import ChannelTable, TableKeeper
from engine.edit import GLOBAL_STRENGTH, render_global_edit
from engine.encoder_io import open_encoder
from engine.errors import EngineError
from engine.generators import LoadedGenerator, load_generator
from engine.identity import load_identity
from engine.images import map_in_threads, tensor_to_pil
from engine.invert import invert
from engine.morph import mix_latents, render_frames
from engine.operations import (
    encode,
    global_edit,
    inversion_quality,
    invert_faces,
    morph_frames,
    neutral_prompt,
    optimize_edit,
    optimize_strength,
)
from engine.optim import batch_bucket
from engine.pasteback import image_grid, paste_back, side_by_side
from engine.perceptual import load_perceptual
from engine.progress import PreviewFn, ProgressFn, no_preview, no_progress
from engine.video import write_animation
from engine.weights import stylebot_home
from settings import EngineConfig
from storage.specs import MORPH_FPS, EditSpec, JobSpec, LineupSpec, MixSpec, MorphSpec

__all__ = ["Engine", "FaceOut", "JobInput", "JobOutcome", "split_on_failure"]

log = logging.getLogger("stylebot.engine")

_PANEL_HEIGHT = 256
_DEFAULTS = EngineConfig()


@dataclass(frozen=True)
class JobInput:
    job_id: str
    spec: JobSpec
    photo: bytes | None = None  # invert: the selfie; edit: the original photo (paste-back)
    latents: Mapping[str, np.ndarray] = field(default_factory=dict)  # "face", "a", "b"
    alignment: Mapping[str, Any] | None = None  # edit: how the face was cut from the photo

    @property
    def kind(self) -> str:
        return self.spec.kind


@dataclass(frozen=True)
class FaceOut:
    latent: np.ndarray  # [num_ws, w_dim] float32
    alignment: dict[str, Any]
    quality: dict[str, Any]


@dataclass
class JobOutcome:
    job_id: str
    result: dict[str, Any] = field(default_factory=dict)
    files: dict[str, tuple[bytes, str]] = field(default_factory=dict)  # result key -> (data, suffix)
    face: FaceOut | None = None
    error: str | None = None
    error_code: str | None = None

    @classmethod
    def failed(cls, job_id: str, exc: EngineError) -> JobOutcome:
        return cls(job_id, error=exc.message, error_code=exc.code)

Handler = Callable[[Sequence["JobInput"], ProgressFn], list["JobOutcome"]]


def split_on_failure(handler: Handler, inputs: list[JobInput], progress: ProgressFn) -> list[JobOutcome]:
    """Run a batch; on CUDA out-of-memory or an unexpected error, split it in halves and retry,
    down to single jobs, so one bad job (or too big a batch) fails alone."""
    try:
        return handler(inputs, progress)
    except torch.cuda.OutOfMemoryError:
        if len(inputs) == 1:
            return [JobOutcome.failed(inputs[0].job_id, EngineError(
                "the GPU ran out of memory for this job; try fewer frames or later"))]
        torch.cuda.empty_cache()
        log.warning("out of GPU memory with a batch of %d: splitting", len(inputs))
    except Exception:
        if len(inputs) == 1:
            log.exception("job %s failed", inputs[0].job_id)
            return [JobOutcome(inputs[0].job_id, error="something went wrong on our side "
                               "while working on this", error_code="internal")]
        log.exception("a batch of %d failed: retrying its jobs apart", len(inputs))
    half = len(inputs) // 2
    return (split_on_failure(handler, inputs[:half], progress)
            + split_on_failure(handler, inputs[half:], progress))


# Threads that convert, resize and PNG-encode a batch's result images: ~0.2 s per 1024 px selfie
# on one core, which the GPU spent waiting for the next batch.
_RESULT_THREADS = min(8, os.cpu_count() or 1)


def _png(img: Image.Image) -> bytes:
    """PNG at zlib level 1: a 1024 px face encodes in about a fifth of the default level's time
    (which the GPU spent idle, between batches) for files about 13% larger."""
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


class Engine:
    """Everything the worker needs, loaded once per process."""

    def __init__(
        self, *, model: str = _DEFAULTS.model, device: torch.device | str = "cpu",
        home: Path | None = None, invert_steps: int = _DEFAULTS.invert_steps,
        edit_steps: int = _DEFAULTS.edit_steps, compile: bool = _DEFAULTS.compile,
        clip: str = _DEFAULTS.clip, table_samples: int = _DEFAULTS.direction_samples,
        build_table_when_idle: bool = _DEFAULTS.build_directions, encoder: str = _DEFAULTS.encoder,
        encoder_invert_steps: int = _DEFAULTS.encoder_invert_steps,
    ) -> None:
        self.loaded: LoadedGenerator = load_generator(model, device=device, home=home)
        self.device = self.loaded.G.w_avg.device
        self.home = home
        self.perceptual = load_perceptual(home=home, device=self.device)
        self.identity = load_identity(home=home, device=self.device)
        self.detector = FaceDetector(device=str(self.device))
        self.edit_steps = edit_steps
        self.encoder = open_encoder(encoder, self.loaded.G, model_id=self.loaded.model_id,
                                    generator_name=self.loaded.name, home=home, device=self.device)
        if self.encoder is not None:
            log.info("encoder %s: selfies start from its guess, then %d steps", self.encoder.name,
                     encoder_invert_steps)
            invert_steps = encoder_invert_steps
        self.invert_steps = invert_steps
        self.compile = compile and self.device.type == "cuda"  # `[engine] compile`: GPU only
        self._clip_name = clip
        self._clip: ClipModel | None = None
        self.table_samples = table_samples
        self.build_table_when_idle = build_table_when_idle
        self._reset_state()

    @classmethod
    def from_config(cls, config: EngineConfig, *, device: torch.device | str) -> Engine:
        """The engine as ``[engine]`` sets it up, on ``device``."""
        return cls(model=config.model, device=device, invert_steps=config.invert_steps,
                   edit_steps=config.edit_steps, compile=config.compile, clip=config.clip,
                   table_samples=config.direction_samples, build_table_when_idle=config.build_directions,
                   encoder=config.encoder, encoder_invert_steps=config.encoder_invert_steps)

    def _reset_state(self) -> None:
        """What the engine learns while it runs (subclasses that load differently call this)."""
        self._keeper: TableKeeper | None = None
        self._eager_ready: set[int] = set()  # batch sizes warmed up uncompiled
        self._compiled: set[int] = set()  # ... and compiled
        self._warming: threading.Thread | None = None
        self._stopping = False
        # One thread at a time on the GPU: a CUDA graph captured while another thread launches
        # work on the default stream is invalidated (seen on an H200). Jobs go first: the warm-up
        # takes the GPU for its next size only when no batch is waiting.
        self._gpu = threading.Condition()
        self._gpu_busy = False
        self._batches_waiting = 0

    @property
    def model_id(self) -> str:
        return self.loaded.model_id

    def warm_up(self, batch_size: int) -> None:
        """On a GPU, before the worker takes jobs: a few uncompiled inversion steps at batch size 1
        (cuDNN tunes its kernels for every new shape; no user waits for that). Then, in a
        background thread while jobs are served, the same for every other size a batch of up to
        ``batch_size`` is padded to (``batch_bucket``), then each size compiled (minutes each: the
        step runs uncompiled until its size is ready). One size is warmed at a time, when no batch
        waits (a batch that comes meanwhile waits for that size). :meth:`ready_batch_size` says
        how many jobs a batch may take. Edits tune themselves on first use."""
        if self.device.type != "cuda":
            return
        sizes = sorted({batch_bucket(n) for n in range(1, batch_size + 1)})
        self._warm(1, compile=False)
        self._eager_ready.add(1)
        if len(sizes) > 1 or self.compile:
            self._warming = threading.Thread(target=self._warm_in_background, args=(sizes,),
                                             name="warm-up", daemon=True)
            self._warming.start()

    def ready_batch_size(self, limit: int) -> int:
        """The most jobs one batch may take now: ``limit``, or while sizes are still warming up
        on a GPU the largest size warmed so far."""
        if self.device.type != "cuda":
            return limit
        return max((n for n in self._eager_ready if n <= limit), default=1)

    def wait_for_warm_up(self, timeout: float | None = None) -> bool:
        """Block until the background warm-up has finished; True if it has."""
        if self._warming is not None:
            self._warming.join(timeout)
            return not self._warming.is_alive()
        return True

    @contextlib.contextmanager
    def _on_gpu(self, *, job: bool) -> Iterator[None]:
        """Hold the GPU; a warm-up step (``job`` False) also waits until no batch is waiting."""
        with self._gpu:
            self._batches_waiting += job
            self._gpu.wait_for(lambda: not self._gpu_busy and (job or not self._batches_waiting))
            self._batches_waiting -= job
            self._gpu_busy = True
        try:
            yield
        finally:
            with self._gpu:
                self._gpu_busy = False
                self._gpu.notify_all()

    def _warm_in_background(self, sizes: list[int]) -> None:
        start = time.perf_counter()
        try:
            for n in sizes:
                if n not in self._eager_ready:
                    with self._on_gpu(job=False):
                        self._warm(n, compile=False)
                    self._eager_ready.add(n)
            if self.compile:
                for n in sizes:
                    with self._on_gpu(job=False):
                        self._warm(n, compile=True)
                    self._compiled.add(n)
        except Exception:  # serving goes on with the sizes that are ready
            log.exception("warm-up stopped; jobs are served at the sizes already warmed")
            return
        log.info("warm-up finished in %.0f s: batch sizes %s%s", time.perf_counter() - start,
                 sizes, ", compiled" if self.compile else "")

    def _warm(self, n: int, *, compile: bool) -> None:
        """Eager steps, the graph's capture, a replay (targets contiguous like real ones)."""
        if self._stopping:
            raise EngineError("the engine is stopping")
        G = self.loaded.G
        log.info("warming up batch size %d%s", n, " compiled (2-3 minutes)" if compile else "")
        start = time.perf_counter()
        with torch.no_grad():
            target = G.synthesis(G.w_avg.reshape(1, 1, -1).repeat(1, G.num_ws, 1)).clamp(-1, 1)
        targets = target.repeat(n, 1, 1, 1)
        guess = encode(self.encoder.encoder, targets) if self.encoder is not None else None
        invert(G, targets, perceptual=self.perceptual, identity=self.identity, steps=5,
               compile=compile, start=guess)
        log.info("batch size %d ready%s in %.0f s", n, " compiled" if compile else "",
                 time.perf_counter() - start)

    @property
    def clip(self) -> ClipModel:
        if self._clip is None:  # loaded on first edit: invert-only workers never pay for it
            self._clip = load_clip(self._clip_name, device=self.device, home=self.home)
        return self._clip

    @property
    def table(self) -> TableKeeper:
        """The global-direction table for (this generator, this CLIP)."""
        if self._keeper is None:
            self._keeper = TableKeeper(self.loaded.G, self.clip.encode_images,
                                       model_hash=self.loaded.content_hash, clip_key=self.clip.model_key,
                                       home=self._home(), samples=self.table_samples)
        return self._keeper

    def idle_work(self) -> bool:
        """Between jobs: one chunk of a missing direction table (a job waits for one chunk at
        most). False when there is nothing to do, so the caller may wait for jobs."""
        if not self.build_table_when_idle:
            return False
        with self._on_gpu(job=True):
            return self.table.build_step()

    def close(self) -> None:
        self._stopping = True  # the background warm-up stops before its next size
        if self._keeper is not None:
            self._keeper.close()

    def _labels(self) -> dict[str, Any]:
        return {"model_label": self.loaded.label, "is_demo": self.loaded.is_demo}

    def run_batch(
        self, kind: str, inputs: Sequence[JobInput], *, progress: ProgressFn = no_progress,
        preview: PreviewFn = no_preview,
    ) -> list[JobOutcome]:
        """Run same-kind jobs together. Never raises for one job's bad input. ``preview(job_id,
        jpeg)``: a first look at a job's result before it is done (an encoder's guess)."""
        invert: Handler = functools.partial(self._invert, preview=preview)
        handler: Handler = {
            "invert": invert, "edit": self._edit,
            "morph": self._each(self._morph),
            "mix": self._each(self._mix), "lineup": self._each(self._lineup),
        }[kind]
        with self._on_gpu(job=True):
            return split_on_failure(handler, list(inputs), progress)

    @staticmethod
    def _each(fn: Callable[[JobInput], JobOutcome]) -> Callable[[Sequence[JobInput], ProgressFn],
                                                                list[JobOutcome]]:
        def run(inputs: Sequence[JobInput], progress: ProgressFn) -> list[JobOutcome]:
            out = []
            for i, job in enumerate(inputs):
                try:
                    out.append(fn(job))
                except EngineError as exc:
                    out.append(JobOutcome.failed(job.job_id, exc))
                progress(i + 1, len(inputs), {})
            return out

        return run

    def _latent(self, job: JobInput, name: str) -> torch.Tensor:
        arr = job.latents.get(name)
        G = self.loaded.G
        if arr is None or arr.shape != (G.num_ws, G.w_dim):
            raise EngineError("this face was saved with another model; please send the selfie again")
        return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)).to(self.device)

    # --- invert: selfie -> latent ---------------------------------------------------------

    def _align(self, photo: bytes) -> AlignedFace:
        return align_face(load_photo(photo), size=self.loaded.G.resolution, detector=self.detector)

    def _invert(self, inputs: Sequence[JobInput], progress: ProgressFn,
                preview: PreviewFn = no_preview) -> list[JobOutcome]:
        G = self.loaded.G
        outcomes: dict[str, JobOutcome] = {}
        ready: list[tuple[JobInput, AlignedFace]] = []
        for job in inputs:
            try:
                if job.photo is None:
                    raise EngineError("the photo for this job is missing")
                face = self._align(job.photo)
                ready.append((job, face))
            except EngineError as exc:
                outcomes[job.job_id] = JobOutcome.failed(job.job_id, exc)
        if ready:
            compiled = batch_bucket(len(ready)) in self._compiled  # else it would compile now

            def first_look(images: torch.Tensor) -> None:
                for (job, face), image in zip(ready, images, strict=True):
                    panel = side_by_side([face.image, tensor_to_pil(image)], height=_PANEL_HEIGHT)
                    preview(job.job_id, _jpeg(panel))

            res = invert_faces(G, [face for _, face in ready], perceptual=self.perceptual,
                               steps=self.invert_steps, identity=self.identity,
                               encoder=self.encoder.encoder if self.encoder is not None else None,
                               compile=self.compile and compiled, progress=progress,
                               first_look=first_look)

            def outcome(i: int) -> JobOutcome:
                job, face = ready[i]
                recon = tensor_to_pil(res.images[i])
                quality = inversion_quality(res, i)
                return JobOutcome(
                    job.job_id,
                    result={**quality, **self._labels(), "note": face.note, "batch": len(ready),
                            "compiled": self.compile and compiled},
                    files={"aligned_key": (_png(face.image), ".png"),
                           "reconstruction_key": (_png(recon), ".png"),
                           "panel_key": (_png(side_by_side([face.image, recon],
                                                           height=_PANEL_HEIGHT)), ".png")},
                    face=FaceOut(latent=res.latents[i].numpy(), alignment=face.alignment.to_json(),
                                 quality=quality))

            done = map_in_threads(outcome, range(len(ready)), max_threads=_RESULT_THREADS)
            outcomes.update((o.job_id, o) for o in done)
        return [outcomes[job.job_id] for job in inputs]

    # --- edit: text -> edited face, pasted back -------------------------------------------

    def _edit(self, inputs: Sequence[JobInput], progress: ProgressFn) -> list[JobOutcome]:
        """Global-direction edits while the table is ready, else (and for "optimize" jobs) the
        optimisation method, each job at its own strength."""
        outcomes: dict[str, JobOutcome] = {}
        table = self.table.ready() if any(_edit_spec(j).method == "global" for j in inputs) else None
        optimize: list[tuple[JobInput, float]] = []
        for job in inputs:
            spec = _edit_spec(job)
            try:
                if spec.method == "optimize":
                    optimize.append((job, optimize_strength(spec.strength)))
                elif table is not None:
                    outcomes[job.job_id] = self._edit_global(job, spec, table)
                else:
                    optimize.append((job, _fallback_strength(spec)))
            except EngineError as exc:
                outcomes[job.job_id] = JobOutcome.failed(job.job_id, exc)
        if optimize:
            outcomes.update(self._edit_optimize(optimize, progress))
        progress(1, 1, {})
        return [outcomes[job.job_id] for job in inputs]

    def _edit_global(self, job: JobInput, spec: EditSpec, table: ChannelTable) -> JobOutcome:
        ws = self._latent(job, "face")[None]
        edit = global_edit(self.loaded.G, ws, table, self.clip, spec.text,
                           neutral=neutral_prompt(self.loaded), strength=spec.strength)
        before = render_global_edit(self.loaded.G, ws, edit.delta, strength=0.0)
        return self._edit_outcome(job, before[0], edit.images[0], {
            "method": "global", "channels": edit.channels, "strength": edit.strength})

    def _edit_optimize(self, jobs: Sequence[tuple[JobInput, float]],
                       progress: ProgressFn) -> dict[str, JobOutcome]:
        good, outcomes = [], {}
        for job, strength in jobs:
            try:
                good.append((job, self._latent(job, "face"), strength))
            except EngineError as exc:
                outcomes[job.job_id] = JobOutcome.failed(job.job_id, exc)
        if not good:
            return outcomes
        source = torch.stack([ws for _, ws, _ in good])
        res = optimize_edit(self.loaded.G, source, [_edit_spec(j).text for j, _, _ in good], self.clip,
                            strengths=[s for _, _, s in good], steps=self.edit_steps,
                            identity=self.identity, progress=progress)
        with torch.no_grad():
            before = self.loaded.G.synthesis(source).clamp(-1, 1)
        building = self.table.progress

        def outcome(i: int) -> JobOutcome:
            job = good[i][0]
            info: dict[str, Any] = {"method": "optimize", "steps": self.edit_steps}
            if _edit_spec(job).method == "global":  # asked for a fast edit: say why it was not one
                info["table_progress"] = building
            return self._edit_outcome(job, before[i], res.images[i].to(self.device), info)

        done = map_in_threads(outcome, range(len(good)), max_threads=_RESULT_THREADS)
        outcomes.update((o.job_id, o) for o in done)
        return outcomes

    def _edit_outcome(self, job: JobInput, before: torch.Tensor, after: torch.Tensor,
                      info: dict[str, Any]) -> JobOutcome:
        face_before, face_after = tensor_to_pil(before), tensor_to_pil(after)
        files = {"face_key": (_png(face_after), ".png"),
                 "before_after_key": (_png(side_by_side([face_before, face_after],
                                                        height=_PANEL_HEIGHT)), ".png")}
        if job.photo is not None and job.alignment is not None:
            photo = load_photo(job.photo)
            pasted = paste_back(photo, face_after, Alignment.from_json(job.alignment))
            files["pasted_key"] = (_jpeg(pasted), ".jpg")
        return JobOutcome(job.job_id, result={**info, **self._labels(), "text": _edit_spec(job).text},
                          files=files)

    def _home(self) -> Path:
        return self.home or stylebot_home()

    # --- morph and mix -------------------------------------------------------------------

    def _morph(self, job: JobInput) -> JobOutcome:
        spec = job.spec
        assert isinstance(spec, MorphSpec)
        a, b = self._latent(job, "a"), self._latent(job, "b")
        more = [self._latent(job, f"more{i}") for i in range(len(spec.more_ids or []))]
        images = morph_frames(self.loaded.G, a, b, frames=spec.frames, layers=spec.layers,
                              pingpong=spec.pingpong, more=more)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"morph.{spec.format}"
            write_animation(images, path, fps=MORPH_FPS)
            data = path.read_bytes()
        return JobOutcome(job.job_id, result={"frames": len(images), "format": spec.format,
                                              **self._labels()},
                          files={"media_key": (data, f".{spec.format}")})

    def _lineup(self, job: JobInput) -> JobOutcome:
        """One text edit of several faces, in a grid: global directions when the table is ready,
        else the optimisation method."""
        spec = job.spec
        assert isinstance(spec, LineupSpec)
        G = self.loaded.G
        ws = torch.stack([self._latent(job, f"more{i}") for i in range(len(spec.face_ids))])
        table = self.table.ready()
        info: dict[str, Any]
        if table is not None:
            edit = global_edit(G, ws, table, self.clip, spec.text, neutral=neutral_prompt(self.loaded),
                               strength=spec.strength)
            images, info = edit.images, {"method": "global", "strength": edit.strength}
        else:
            strength = _fallback_strength(EditSpec(face_id=0, text=spec.text, strength=spec.strength))
            res = optimize_edit(G, ws, [spec.text] * len(ws), self.clip, strengths=[strength] * len(ws),
                                steps=self.edit_steps, identity=self.identity)
            images, info = res.images, {"method": "optimize", "table_progress": self.table.progress}
        grid = image_grid([tensor_to_pil(img) for img in images], side=_PANEL_HEIGHT)
        return JobOutcome(job.job_id, result={**info, **self._labels(), "text": spec.text,
                                              "people": len(ws)},
                          files={"media_key": (_png(grid), ".png")})

    def _mix(self, job: JobInput) -> JobOutcome:
        spec = job.spec
        assert isinstance(spec, MixSpec)
        a, b = self._latent(job, "a"), self._latent(job, "b")
        mixed = mix_latents(a, b, layers=spec.layers)
        images = render_frames(self.loaded.G, torch.stack([a, b, mixed]))
        panel = side_by_side([Image.fromarray(x) for x in images], height=_PANEL_HEIGHT)
        return JobOutcome(job.job_id, result={"layers": spec.layers, **self._labels()},
                          files={"media_key": (_png(panel), ".png")})


def _edit_spec(job: JobInput) -> EditSpec:
    assert isinstance(job.spec, EditSpec)
    return job.spec


def _fallback_strength(spec: EditSpec) -> float:
    """The optimisation strength standing in for a global edit's (its default maps to 1)."""
    strength = GLOBAL_STRENGTH if spec.strength is None else float(spec.strength)
    if strength < 0:
        raise EngineError("reversed edits (a negative strength) need the fast edits, which are "
                          "still being prepared; please try again later")
    return max(0.1, strength / GLOBAL_STRENGTH)


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=92)
    return buf.getvalue()
