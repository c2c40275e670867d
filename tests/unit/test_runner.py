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
from engine.images import tensor_to_pil
from engine.progress import ProgressFn, no_progress
from engine.runner import Engine, JobInput, JobOutcome, _jpeg, split_on_failure
from storage.specs import EditSpec, InvertSpec, LineupSpec


def _inputs(n: int) -> list[JobInput]:
    return [JobInput(job_id=f"j{i}", spec=InvertSpec(photo_key="")) for i in range(n)]


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
    inputs = [JobInput(job_id=f"j{i}", spec=InvertSpec(photo_key=f"k{i}"), photo=_jpeg(p))
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
        # The latent stored for this user is the one that rendered their reconstruction.
        assert o.face is not None
        with torch.no_grad():
            latent = torch.from_numpy(o.face.latent)[None]
            render = np.asarray(tensor_to_pil(engine.loaded.G.synthesis(latent)[0])).astype(np.float64)
        assert np.abs(render - recon).max() <= 1


@pytest.fixture(scope="module")
def edit_engine() -> Engine:
    return Engine(model="demo", device="cpu", edit_steps=8, clip="demo", table_samples=1)


def _edit_job(job_id: str, latent: np.ndarray, **payload: object) -> JobInput:
    spec = EditSpec(face_id=1, text="smiling face", **payload)  # type: ignore[arg-type]
    return JobInput(job_id=job_id, spec=spec, latents={"face": latent})


def _face_png(outcome: JobOutcome) -> np.ndarray:
    assert outcome.error is None, outcome.error
    return np.asarray(Image.open(io.BytesIO(outcome.files["face_key"][0]))).astype(np.float64)


def _latent(engine: Engine, seed: int) -> np.ndarray:
    G = engine.loaded.G
    with torch.no_grad():
        z = torch.randn(1, G.cfg.z_dim, generator=torch.Generator().manual_seed(seed))
        return G.mapping(z, truncation_psi=0.7)[0].numpy()


def test_batched_optimisation_edits_each_keep_their_own_strength(edit_engine: Engine) -> None:
    """One user's strength never changes another's result: each edit of a batch comes out as it
    does alone."""
    face = _latent(edit_engine, 1)
    weak = _edit_job("weak", face, method="optimize", strength=0.2)
    strong = _edit_job("strong", face, method="optimize", strength=8.0)
    together = edit_engine.run_batch("edit", [weak, strong])
    alone = [edit_engine.run_batch("edit", [job])[0] for job in (weak, strong)]
    for batched, single in zip(together, alone, strict=True):
        assert np.abs(_face_png(batched) - _face_png(single)).max() <= 2
    assert np.abs(_face_png(together[0]) - _face_png(together[1])).mean() > 1


def test_edits_use_the_optimisation_until_the_table_is_built_between_jobs(
    edit_engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    face = _latent(edit_engine, 2)
    (first,) = edit_engine.run_batch("edit", [_edit_job("e1", face, strength=4.0)])
    assert first.error is None and first.result["method"] == "optimize"
    assert first.result["table_progress"] is None  # not started yet
    (reversed_,) = edit_engine.run_batch("edit", [_edit_job("e2", face, strength=-3.0)])
    assert reversed_.error is not None and "negative strength" in reversed_.error
    caplog.set_level("INFO", logger="stylebot.engine")
    chunks = 0
    while edit_engine.idle_work():
        chunks += 1
        if chunks == 2:  # part-way: an edit now says how far the table is
            (mid,) = edit_engine.run_batch("edit", [_edit_job("e3", face)])
            assert 0 < mid.result["table_progress"] < 1
    assert chunks > 2 and edit_engine.table.ready() is not None
    assert "direction table ready" in caplog.text and "direction table for fast edits: 50%" in caplog.text
    (fast,) = edit_engine.run_batch("edit", [_edit_job("e4", face, strength=-3.0)])
    assert fast.error is None and fast.result["method"] == "global" and "table_progress" not in fast.result
    assert not edit_engine.idle_work()  # nothing left to do between jobs


def test_a_lineup_is_one_grid_of_everyone_with_the_same_edit(edit_engine: Engine) -> None:
    latents = {f"more{i}": _latent(edit_engine, seed) for i, seed in enumerate((1, 2, 3))}
    spec = LineupSpec(face_ids=[1, 2, 3], text="smiling face", names=["a", "b", "c"])
    [out] = edit_engine.run_batch("lineup", [JobInput(job_id="l1", spec=spec, latents=latents)])
    assert out.error is None, out.error
    grid = Image.open(io.BytesIO(out.files["media_key"][0]))
    assert grid.size == (3 * 256 + 2 * 8, 256) and out.result["people"] == 3
    cells = [np.asarray(grid.crop((i * 264, 0, i * 264 + 256, 256))).astype(float) for i in range(3)]
    assert all(np.abs(cells[i] - cells[j]).mean() > 1 for i in range(3) for j in range(i))  # 3 faces
    [bad] = edit_engine.run_batch("lineup", [JobInput(job_id="l2", spec=spec, latents={})])
    assert bad.error is not None and "another model" in bad.error
