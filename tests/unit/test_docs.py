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


ROOT = Path(__file__).parents[2]
PAGES = [ROOT / "README.md", ROOT / "CHANGELOG.md", ROOT / "model_repository" / "README.md",
         *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "bench" / "results").glob("*.md"))]


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    import re

    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.MULTILINE | re.DOTALL)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
            for h in re.findall(r"^#+ (.*)$", text, flags=re.MULTILINE)}


def test_every_relative_link_in_the_documentation_resolves_inside_the_repository():
    import re

    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:", target):
                continue  # https:, mailto:
            path, _, anchor = target.partition("#")
            resolved = (page.parent / path).resolve() if path else page
            if not resolved.is_relative_to(ROOT) or not resolved.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
            elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, broken


def test_the_documentation_points_nowhere_outside_the_repository():
    outside = [f"{p.relative_to(ROOT)}: {line.strip()}" for p in PAGES
               for line in p.read_text().splitlines() if "../shared/" in line or "/work/" in line]
    assert not outside, outside
