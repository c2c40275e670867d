"""Batches of jobs: one that fails (CUDA out of memory, one bad job) is split so that only the
bad job fails; one that succeeds gives every job its own results."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance

from engine.align import align_face, load_photo
from engine.jobs import Engine, JobInput, JobOutcome, _jpeg, split_on_failure
from engine.progress import ProgressFn, no_progress


def _inputs(n: int) -> list[JobInput]:
    return [JobInput(job_id=f"j{i}", kind="invert", payload={}) for i in range(n)]


def test_out_of_memory_splits_until_the_batch_fits() -> None:
    sizes: list[int] = []

    def handler(jobs: Sequence[JobInput], progress: ProgressFn) -> list[JobOutcome]:
        sizes.append(len(jobs))
        if len(jobs) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return [JobOutcome(j.job_id, result={"ok": True}) for j in jobs]

    out = split_on_failure(handler, _inputs(8), no_progress)
    assert [o.job_id for o in out] == [f"j{i}" for i in range(8)]
    assert all(o.error is None for o in out) and max(sizes[1:]) <= 4 and sizes[0] == 8


def test_one_poisoned_job_fails_alone(caplog: pytest.LogCaptureFixture) -> None:
    def handler(jobs: Sequence[JobInput], progress: ProgressFn) -> list[JobOutcome]:
        if any(j.job_id == "j3" for j in jobs):
            raise ValueError("a bug triggered by this job's data")
        return [JobOutcome(j.job_id, result={"ok": True}) for j in jobs]

    out = split_on_failure(handler, _inputs(6), no_progress)
    failed = [o for o in out if o.error is not None]
    assert [o.job_id for o in failed] == ["j3"] and failed[0].error_code == "internal"
    assert "Traceback" not in (failed[0].error or "")  # users never see a traceback
    assert len(out) == 6


def test_a_single_job_out_of_memory_gets_a_clear_reason() -> None:
    def handler(jobs: Sequence[JobInput], progress: ProgressFn) -> list[JobOutcome]:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    (out,) = split_on_failure(handler, _inputs(1), no_progress)
    assert out.error is not None and "memory" in out.error


def test_each_selfie_in_a_batch_gets_its_own_results_back(astronaut: Image.Image) -> None:
    """A batch's result images are encoded on several threads: every user still gets the face
    cut from their own photo, and the reconstruction their own quality figures describe."""
    engine = Engine(model="demo", device="cpu", invert_steps=3, clip="demo")
    photos = [ImageEnhance.Brightness(astronaut).enhance(b) for b in (1.0, 0.6, 0.3)]
    inputs = [JobInput(job_id=f"j{i}", kind="invert", payload={}, photo=_jpeg(p))
              for i, p in enumerate(photos)]
    out = engine.run_batch("invert", inputs)
    assert [o.job_id for o in out] == ["j0", "j1", "j2"] and all(o.error is None for o in out)
    size = engine.loaded.G.resolution
    for job, o in zip(inputs, out, strict=True):
        assert job.photo is not None
        own = np.asarray(align_face(load_photo(job.photo), size=size, detector=engine.detector).image)
        aligned = np.asarray(Image.open(io.BytesIO(o.files["aligned_key"][0])))
        assert np.array_equal(aligned, own)
        recon = np.asarray(Image.open(io.BytesIO(o.files["reconstruction_key"][0]))).astype(np.float64)
        mse = np.mean(((recon - own.astype(np.float64)) / 127.5) ** 2)
        assert abs(10 * np.log10(4 / mse) - o.result["psnr"]) < 0.5  # PSNR on [-1, 1] images
