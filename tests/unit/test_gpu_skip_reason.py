"""Without a GPU the GPU tests skip with a reason that says so, not one that reads like a
broken driver."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from trtserve import cuda

ROOT = Path(__file__).resolve().parents[2]


def test_the_gpu_tests_say_there_is_no_gpu_on_this_machine():
    if cuda.is_available():
        pytest.skip("a CUDA device is present: the GPU tests run here instead of skipping")
    done = subprocess.run([sys.executable, "-m", "pytest", "tests/gpu/test_cuda_runtime.py", "-rs", "-q", "-p", "no:cacheprovider"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:]
    assert "SKIPPED" in done.stdout and "no GPU on this machine" in done.stdout, done.stdout[-2000:]
