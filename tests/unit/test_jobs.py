"""A batch that fails (CUDA out of memory, one bad job) is split so that only the bad job fails."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch

from engine.jobs import JobInput, JobOutcome, split_on_failure
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
