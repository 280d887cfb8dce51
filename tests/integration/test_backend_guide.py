"""docs/writing-a-backend.md's complete example: its model folder, used in-process and served.

The files the guide shows (a block whose first line is ``# softmax/<file>``) are written
into a fresh repository; the in-process snippet runs there, the client snippet against
``trtserve serve --repository`` that folder; each prints what the guide says it prints.
"""
from __future__ import annotations

import pytest

from .doc_support import ROOT, blocks, run_python, start_server, the_block

GUIDE = (ROOT / "docs" / "writing-a-backend.md").read_text()


@pytest.fixture(scope="module")
def repository(tmp_path_factory):
    root = tmp_path_factory.mktemp("guide")
    files = [code for _, code, _ in blocks(GUIDE) if code.startswith("# softmax/")]
    for code in files:
        path = root / code.split("\n", 1)[0][2:].strip()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(code)
    assert sorted(p.name for p in (root / "softmax").iterdir()) == ["backend.py", "config.toml"]
    return root


def test_the_guide_states_the_output_of_each_snippet():
    snippets = [b for b in blocks(GUIDE, "python") if "print(" in b[1]]
    assert len(snippets) == 2 and all(output is not None for _, _, output in snippets)


def test_the_contract_sketch_names_what_the_base_class_has():
    import ast

    import trtserve

    code, _ = the_block(GUIDE, "python", "class MyBackend(trtserve.Backend)")
    [cls] = [n for n in ast.parse(code).body if isinstance(n, ast.ClassDef)]
    names = [n.name for n in cls.body if isinstance(n, ast.FunctionDef)]
    names += [t.id for n in cls.body if isinstance(n, ast.Assign) for t in n.targets]
    assert len(names) >= 13
    missing = [name for name in names if not hasattr(trtserve.Backend, name)]
    assert not missing, f"the guide's contract names what trtserve.Backend lacks: {missing}"


def test_the_example_in_process(repository):
    code, output = the_block(GUIDE, "python", "trtserve.pipe(")
    assert run_python(code, repository) == output


def test_the_example_served(repository, tmp_path):
    server = start_server(["serve", "--repository", str(repository)], tmp_path / "trtserve.log")
    try:
        code, output = the_block(GUIDE, "python", "Client(")
        assert run_python(code, tmp_path, port=server.port) == output
    finally:
        server.close()
