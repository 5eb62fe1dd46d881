"""Shared helpers and fixtures of the end-to-end tests (test_build, test_bad_inputs, test_cli).

The reference build (20 pairs of the embedded sample in 4 shards of 5, seed 0) is built once
per session through the CLI; tests that change files work on a copy of it.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from synthetic import SAMPLE

from datagen.cli import main

REFERENCE_N = 20
REFERENCE_SHARD_SIZE = 5
REFERENCE_SHARDS = REFERENCE_N // REFERENCE_SHARD_SIZE


def make_runner() -> CliRunner:
    """A CliRunner that keeps stderr apart from stdout (click < 8.2 needs mix_stderr=False)."""
    try:
        return CliRunner(mix_stderr=False)
    except TypeError:
        return CliRunner()


def all_output(result) -> str:
    """stdout and stderr of a CliRunner result, whatever the click version."""
    try:
        stderr = result.stderr
    except ValueError:  # click < 8.2 with mixed streams
        stderr = ""
    return f"{result.output}\n{stderr}"


def run_cli(args, expect: int | None = 0):
    """Invoke ``datagen ARGS`` in-process; check the exit code unless ``expect`` is None."""
    result = make_runner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    if expect is not None:
        assert result.exit_code == expect, (
            f"datagen {' '.join(map(str, args))} exited {result.exit_code}, expected {expect}:\n"
            f"{all_output(result)}")
    return result


def build_args(out: Path, n: int = REFERENCE_N, shard_size: int = REFERENCE_SHARD_SIZE, seed: int = 0,
               workers: int = 1, manifests: Path | None = None, extra=()) -> list[str]:
    """Arguments of ``datagen build`` (embedded sample unless ``extra`` says otherwise)."""
    manifests = manifests or out.parent / f"{out.name}-manifests"
    return ["build", "--n", n, "--shard-size", shard_size, "--seed", seed, "--workers", workers,
            "--out", out, "--manifests-dir", manifests, "--no-progress", "--style", "none", *extra]


def output_files(directory: Path) -> dict[str, bytes]:
    """Bytes of every build output of ``directory``: shard tars, sample parquet, stats, manifest."""
    names = sorted(p.name for p in directory.glob("shard-*") if not p.name.endswith(".tmp"))
    files = {name: (directory / name).read_bytes() for name in names}
    files["manifest.json"] = (directory / "manifest.json").read_bytes()
    return files


def shard_files(directory: Path, pattern: str = "shard-*.tar") -> list[str]:
    return sorted(p.name for p in directory.glob(pattern))


@pytest.fixture(scope="session")
def reference(tmp_path_factory) -> Path:
    """Output directory of ``datagen build --n 20 --shard-size 5 --seed 0 --workers 1`` (read only)."""
    out = tmp_path_factory.mktemp("reference") / "out"
    run_cli(build_args(out))
    return out


@pytest.fixture(scope="session")
def reference_seed1(tmp_path_factory) -> Path:
    """The reference command with ``--seed 1`` (read only)."""
    out = tmp_path_factory.mktemp("reference_seed1") / "out"
    run_cli(build_args(out, seed=1))
    return out


@pytest.fixture
def reference_copy(reference, tmp_path) -> Path:
    """A private copy of the reference build, free to damage."""
    out = tmp_path / "copy"
    shutil.copytree(reference, out)
    return out


def pytest_configure(config):
    """One torch thread: on a small shared machine more threads than free cores slow the CPU
    forward passes of the trainer tests tenfold."""
    try:
        import torch
    except ImportError:
        return
    torch.set_num_threads(1)


def isolated_home(tmp_path: Path, monkeypatch, *env_vars: str) -> Path:
    """A new HOME in ``tmp_path``, with XDG_CACHE_HOME, TORCH_HOME and ``env_vars`` unset: weights
    searches see no file of the machine's own caches. Returns the HOME folder."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for name in ("XDG_CACHE_HOME", "TORCH_HOME", *env_vars):
        monkeypatch.delenv(name, raising=False)
    return home


@pytest.fixture(scope="session")
def bank(tmp_path_factory):
    """The segment bank of the embedded sample (read only)."""
    from datagen.segments.bank import SegmentBank, write_bank
    from datagen.segments.coco_source import CocoSource

    directory = tmp_path_factory.mktemp("bank")
    write_bank(CocoSource(SAMPLE / "annotations" / "instances_train2017.json", SAMPLE / "train2017").scan(),
               directory)
    return SegmentBank.load(directory)
