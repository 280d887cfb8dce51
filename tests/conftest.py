"""For every test: the client library under test is this checkout's ``clients/``.

``pip install -e .`` installs the client as a copy (docs/packaging.md); after an edit in
``clients/`` the tests would run the old copy and pass or fail for the wrong reason.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import trtserve_client

SOURCE = Path(__file__).resolve().parents[1] / "clients" / "trtserve_client"


def pytest_configure(config: pytest.Config) -> None:
    installed = Path(trtserve_client.__file__).resolve().parent
    if installed == SOURCE:
        return
    stale = [p.name for p in sorted(SOURCE.glob("*.py"))
             if not (installed / p.name).is_file() or (installed / p.name).read_bytes() != p.read_bytes()]
    if stale:
        raise pytest.UsageError(
            f"trtserve_client in {installed} differs from {SOURCE} ({', '.join(stale)}): the tests would run "
            "the old client; run `pip install -e ./clients` (an editable client), then the tests again")
