"""The benchmark that reaches into the engine's internals (the streaming prune's skeleton and the CLI's
stream decision) still runs, on the smallest model it knows. Its figures are not judged here."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent


def test_stream_memory_runs_streamed_and_loaded_whole(tmp_path):
    cmd = [
        sys.executable,
        "benchmarks/stream_memory.py",
        "--model",
        "gpt2-small",
        "--dir",
        str(tmp_path),
        "--baseline",
        "--spectra",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    for line in ("peak RSS / checkpoint size", "interpreter floor", "baseline, loaded whole", "spectra, streamed"):
        assert line in done.stdout, done.stdout
    assert list(tmp_path.iterdir()) == []  # it deletes what it wrote
