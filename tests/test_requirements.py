"""Every third-party package the code imports is declared in setup.cfg.

A package installed by hand on a developer's machine hides a missing declaration until a user's
fresh install fails; this test fails first. It reads the imports of every module (top-level and
inside functions) with ``ast`` and compares them with ``install_requires`` (for ``datagen/``,
``trainer/``) and with ``install_requires`` plus the ``test`` extra (for ``tests/``,
``benchmarks/``)."""
from __future__ import annotations

import ast
import configparser
import functools
import importlib.metadata
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OWN = {"datagen", "trainer"}
LOCAL_MODULES = {path.stem for folder in ("tests", "benchmarks") for path in (ROOT / folder).glob("*.py")}
"""Modules of tests/ and benchmarks/, imported by name from those folders."""
IMPORT_TO_DISTRIBUTION = {"cv2": "opencv-python-headless", "PIL": "pillow", "skimage": "scikit-image",
                          "yaml": "pyyaml", "sklearn": "scikit-learn"}
"""Import names that differ from their distribution's name (used when the package is not
installed, so that importlib.metadata cannot tell)."""
USED_WITHOUT_IMPORT = {"tensorboard": "torch.utils.tensorboard writes the event files through it"}
OPTIONAL_IMPORTS = {"distributed": "cluster", "dask": "cluster"}
"""Packages that datagen/ imports only on an optional path (``--scheduler``), with the extra of
setup.cfg that declares them."""


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_names(text: str) -> set[str]:
    """Distribution names of a setup.cfg requirement list (one per line, PEP 508)."""
    names = set()
    for line in text.splitlines():
        line = line.split("#")[0].strip()
        if line:
            names.add(normalise(re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", line).group(0)))
    return names


def declared() -> tuple[set[str], set[str]]:
    """(install_requires, the test extra) of setup.cfg, as normalised distribution names."""
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    return (requirement_names(config["options"]["install_requires"]),
            requirement_names(config["options.extras_require"]["test"]))


def imported_modules(folder: Path) -> dict[str, str]:
    """Top-level names of the absolute imports of every .py file under ``folder``, with one file
    that imports each."""
    modules = {}
    for path in sorted(folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                modules.setdefault(name.split(".")[0], str(path.relative_to(folder.parent)))
    return modules


@functools.cache
def installed_distributions() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()


def distributions_of(module: str) -> set[str]:
    """Normalised names of the distributions that provide import name ``module``."""
    installed = installed_distributions().get(module, [])
    return {normalise(name) for name in installed} or {normalise(IMPORT_TO_DISTRIBUTION.get(module, module))}


def third_party(modules: dict[str, str]) -> dict[str, str]:
    return {name: path for name, path in modules.items()
            if name not in sys.stdlib_module_names and name not in OWN | LOCAL_MODULES}


def extra_names(extra: str | None) -> set[str]:
    """Normalised distribution names of one extra of setup.cfg (empty for None)."""
    if extra is None:
        return set()
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    return requirement_names(config["options.extras_require"][extra])


@pytest.mark.parametrize("folder", ["datagen", "trainer"])
def test_package_imports_are_runtime_requirements(folder):
    runtime, _ = declared()
    missing = {name: path for name, path in third_party(imported_modules(ROOT / folder)).items()
               if not distributions_of(name) & (runtime | extra_names(OPTIONAL_IMPORTS.get(name)))}
    assert not missing, f"imported but not in setup.cfg's install_requires: {missing}"


@pytest.mark.parametrize("folder", ["tests", "benchmarks"])
def test_test_and_benchmark_imports_are_declared(folder):
    runtime, test_extra = declared()
    missing = {name: path for name, path in third_party(imported_modules(ROOT / folder)).items()
               if not distributions_of(name) & (runtime | test_extra)}
    assert not missing, f"imported but in neither install_requires nor the test extra: {missing}"


def test_every_runtime_requirement_is_used():
    """A declaration nothing imports is a download for nothing (or a sign of a renamed import)."""
    runtime, _ = declared()
    used = set()
    for folder in ("datagen", "trainer"):
        for name in third_party(imported_modules(ROOT / folder)):
            used |= distributions_of(name)
    unused = runtime - used - set(USED_WITHOUT_IMPORT)
    assert not unused, f"declared in install_requires but imported nowhere in datagen/ or trainer/: {unused}"


def test_the_scan_sees_imports_inside_functions(tmp_path):
    """The check is only as good as its scan: lazy imports (timm, safetensors) count too."""
    (tmp_path / "lazy.py").write_text("def load():\n    import timm.models\n    from safetensors.torch import x\n")
    assert set(imported_modules(tmp_path)) == {"timm", "safetensors"}
