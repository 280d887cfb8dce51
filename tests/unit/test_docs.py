"""The configuration reference documents every key the built-in backends accept."""
from pathlib import Path

from trtserve.backend import _BUILTIN, backend_class
from trtserve.config import NODE_KEYS

DOC = (Path(__file__).parents[2] / "docs" / "configuration.md").read_text()


def test_every_config_key_is_documented():
    keys = set(NODE_KEYS)
    for name in _BUILTIN:
        keys.update(backend_class(name).config_keys)
    missing = sorted(k for k in keys if f"`{k}`" not in DOC)
    assert not missing, f"document these keys in docs/configuration.md: {missing}"


def test_every_ray_table_key_is_documented():
    from trtserve.scaleout.settings import KEYS

    missing = sorted(k for k in KEYS if f"| `{k}` |" not in DOC)
    assert not missing, f"document these [ray] keys in docs/configuration.md: {missing}"
