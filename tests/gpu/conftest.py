"""GPU tests run only where CUDA is present; everywhere else they are skipped, with the reason."""
from __future__ import annotations

from pathlib import Path

import pytest

from trtserve import cuda

_HERE = Path(__file__).parent


def pytest_collection_modifyitems(config, items):
    if cuda.is_available():
        return
    skip = pytest.mark.skip(reason=f"no GPU on this machine (the GPU tests run where CUDA sees one; here: "
                                   f"{cuda.unavailable_reason()})")
    for item in items:
        if _HERE in Path(str(item.fspath)).parents:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _device_healthy():
    """A GPU test must never poison this process (sticky errors are tested in subprocesses)."""
    cuda.raise_if_poisoned()
    yield
    cuda.raise_if_poisoned()


@pytest.fixture
def stream():
    """A fresh stream, current on the test's thread for the test's duration."""
    with cuda.Stream() as s, cuda.use_stream(s):
        yield s
