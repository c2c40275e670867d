"""`stylebot encoder train` as a user runs it: a real process, the demo model, on the CPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

STYLEBOT = Path(sys.executable).with_name("stylebot")


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([str(STYLEBOT), "encoder", "train", *args], capture_output=True,
                          text=True, env=env, timeout=300)


def test_train_then_resume_then_a_mistake(tmp_path: Path) -> None:
    out = tmp_path / "enc.safetensors"
    common = ["--model", "demo", "--device", "cpu", "--batch-size", "2", "--out", str(out)]
    proc = _run(*common, "--steps", "2")
    assert proc.returncode == 0, proc.stderr
    assert "demo model" in proc.stderr and "training encoder" in proc.stderr
    assert "eta_s" in proc.stderr  # the bar shows this run's ETA
    assert out.is_file() and out.with_suffix(".train.safetensors").is_file()

    proc = _run(*common, "--steps", "3")
    assert proc.returncode == 0, proc.stderr
    assert "resuming from step 2 of 3" in proc.stderr
    assert "encoder at step 3" in proc.stderr.strip().splitlines()[-1]

    proc = _run("--model", "demo", "--device", "cpu", "--steps", "1", "--out",
                str(tmp_path / "enc.pt"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("stylebot: error:")
