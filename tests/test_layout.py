"""The layout's promises: ``trainer`` reads only the on-disk contract of ``datagen``
(``datagen.format``), and that contract depends on nothing else of ``datagen``."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def datagen_imports(folder: Path) -> list[tuple[str, str]]:
    """(file, module) of every import of a datagen module in ``folder``'s Python files, including
    imports inside functions and ``from datagen import name``."""
    found = []
    for path in sorted(folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names
                                           if node.module == "datagen"]
            else:
                continue
            found += [(path.name, m) for m in modules if m.split(".")[0] == "datagen"]
    return found


def outside_format(imports):
    return [(path, module) for path, module in imports
            if module != "datagen" and module != "datagen.__version__" and module != "datagen.format"
            and not module.startswith("datagen.format.")]


@pytest.mark.parametrize("folder", ["trainer", "datagen/format"])
def test_only_the_format_is_shared(folder):
    imports = datagen_imports(ROOT / folder)
    if folder == "trainer":
        assert imports, "the trainer reads shards through datagen.format"
    assert outside_format(imports) == []


def test_the_check_sees_a_forbidden_import(tmp_path):
    (tmp_path / "bad.py").write_text("def f():\n    from datagen.synth.pairs import PairBuilder\n"
                                     "from datagen import config\n")
    assert sorted(m for _, m in outside_format(datagen_imports(tmp_path))) == ["datagen.config",
                                                                                "datagen.synth.pairs"]
