"""``datagen build --out s3://...``: a build into a bucket (moto's S3 server on loopback) holds the
bytes of a local build, survives ``kill -9`` and damage in the store, keeps a second build out
while it runs, and refuses a URL it cannot write before any work."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REFERENCE_SHARDS, all_output, build_args, output_files, run_cli

from datagen.cli import SAMPLE_ROOT
from datagen.config import BuildConfig
from datagen.format.manifest import MANIFEST_NAME, stats_name
from datagen.format.shards import shard_name
from datagen.format.storage import Store
from datagen.runner.errors import BuildError
from datagen.runner.lock import LOCK_NAME, LockedError, StoreLock
from datagen.runner.run import SourceSpec, build
from datagen.runner.store import default_work_dir

pytest_plugins = ["s3_helpers"]  # the fixtures s3 and s3_endpoint (moto's S3 server)


def store_files(url: str) -> dict[str, bytes]:
    """Every file in the store folder ``url`` and its bytes, read back from the store."""
    store = Store(url)
    return {name: store.fs.cat_file(store.path(name)) for name in store.names()}


def shards_in_transit(work: Path) -> list[str]:
    """Shard files left in a work folder (none once a build has uploaded them)."""
    return sorted(str(path.relative_to(work)) for path in work.rglob("shard-*"))


def start_build(args) -> subprocess.Popen:
    """``datagen ARGS`` in a process of its own (the AWS_* environment of the test goes with it)."""
    return subprocess.Popen([sys.executable, "-m", "datagen.cli", *map(str, args)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)


def wait_for(process: subprocess.Popen, ready, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert process.poll() is None, f"the build ended before {what}: {process.stderr.read().decode()}"
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.01)


def stop(process: subprocess.Popen) -> None:
    process.kill()
    process.wait()
    process.stderr.close()


# -- the bytes ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_build_into_a_bucket_is_the_local_build_byte_for_byte(reference, s3, tmp_path, monkeypatch):
    """Every shard, its rows, its stats and the manifest, read back from the store, are the local
    build's bytes (two workers here, one there: each worker process uploads its own shards); the
    work folder keeps the bank and no shard; verify reads the set from the store and passes."""
    from joblib.externals.loky import get_reusable_executor

    # worker processes that an earlier test started lack this test's AWS_* variables (a command
    # line build starts its own): start fresh ones
    get_reusable_executor().shutdown(wait=True)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    url = f"{s3}/sets/x"
    result = run_cli(build_args(url, workers=2, manifests=tmp_path / "manifests"))
    manifest = json.loads((reference / MANIFEST_NAME).read_text())
    assert f"manifest {url}/manifest.json" in result.output

    assert store_files(url) == output_files(reference)  # nothing more either: the lock object is gone
    work = default_work_dir(url)
    assert work.is_relative_to(tmp_path / "cache" / "segswap" / "builds")
    assert (work / "bank" / "inputs.json").is_file() and shards_in_transit(work) == []
    copy = tmp_path / "manifests" / f"x-{manifest['fingerprint'][:12]}.json"
    assert copy.read_bytes() == (reference / MANIFEST_NAME).read_bytes()

    result = run_cli(["verify", url, "--quiet"])
    assert f"fingerprint {manifest['fingerprint']}" in result.output


# -- kill, damage ------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_build_into_a_bucket_killed_mid_way_completes_the_identical_set_on_rerun(reference, s3, tmp_path):
    url, work = f"{s3}/killed", tmp_path / "work"
    args = build_args(url, manifests=tmp_path / "manifests", extra=["--work", work])
    store = Store(url)
    process = start_build(args)
    try:
        wait_for(process, lambda: store.names("shard-*.stats.json"), "shard in the store")
        process.kill()  # SIGKILL: no cleanup of any kind, the lock object stays in the store
        process.wait()
        assert process.returncode == -9
    finally:
        stop(process)
    done = store.names("shard-*.stats.json")
    assert 1 <= len(done) < REFERENCE_SHARDS, f"the build was not interrupted mid-way: {done}"
    assert MANIFEST_NAME not in store.names() and LOCK_NAME in store.names()

    message = all_output(run_cli(args))
    assert "taking over the lock" in message and "this build holds its work folder's lock" in message
    assert f"resuming: {len(done)} of {REFERENCE_SHARDS} shards already complete" in message
    assert store_files(url) == output_files(reference)
    assert shards_in_transit(work) == []


@pytest.mark.slow
def test_shards_damaged_in_the_bucket_are_rebuilt_on_rerun(reference, s3, tmp_path):
    """The store holds the reference set as a build leaves it (published here, to save a build).
    A tar with one byte flipped (same size), a deleted stats marker and a deleted tar: each of
    those shards is rebuilt, the intact one kept, and the set ends as the local build's bytes."""
    url = f"{s3}/damaged"
    run_cli(["publish", reference, url, "--catalog", tmp_path / "catalog", "--no-progress"])
    store = Store(url)
    tar = bytearray(store.fs.cat_file(store.path(shard_name(1))))
    tar[len(tar) // 2] ^= 0x01
    store.fs.pipe_file(store.path(shard_name(1)), bytes(tar))
    store.remove(stats_name(2))
    store.remove(shard_name(3))
    assert store.size(shard_name(1)) == (reference / shard_name(1)).stat().st_size

    message = all_output(run_cli(build_args(url, manifests=tmp_path / "manifests",
                                            extra=["--work", tmp_path / "work"])))
    assert f"{url}/{shard_name(1)}: its bytes differ from the checksum recorded" in message
    assert f"resuming: 1 of {REFERENCE_SHARDS} shards already complete" in message
    assert store_files(url) == output_files(reference)


# -- one build at a time -------------------------------------------------------------------------

@pytest.mark.slow
def test_a_second_build_into_the_same_bucket_stops_at_once_naming_the_first(s3, tmp_path):
    """With the first build's work folder the local lock stops it; with another (as on another
    machine) the lock object in the store does. Neither touches the store or scans a bank."""
    url, work, other = f"{s3}/busy", tmp_path / "work", tmp_path / "other-work"
    store = Store(url)
    first = start_build(build_args(url, n=2000, manifests=tmp_path / "m1", extra=["--work", work]))
    try:
        wait_for(first, lambda: store.size(LOCK_NAME) is not None, "lock object in the store")
        for where, option in ((work, "--work"), (other, "--out")):
            started = time.monotonic()
            result = run_cli(build_args(url, manifests=tmp_path / "m2", extra=["--work", where]), expect=1)
            assert time.monotonic() - started < 10
            message = all_output(result)
            assert f"pid {first.pid}" in message and "being written by" in message, message
            assert f"use another {option}" in message and "Traceback" not in message
        assert str(work.resolve()) in message and url in message  # the store's lock names the holder's folder
        assert not (other / "bank").exists()
        assert first.poll() is None
    finally:
        stop(first)


@pytest.mark.slow
def test_a_lock_left_by_another_machine_is_refused_until_broken(s3, tmp_path):
    url = f"{s3}/elsewhere"
    store = Store(url)
    record = {"pid": 4242, "host": "builder-7.example", "command": "datagen build", "started": "yesterday",
              "work": "/scratch/work"}
    store.write_bytes(LOCK_NAME, json.dumps(record).encode())
    args = build_args(url, n=2, shard_size=2, manifests=tmp_path / "manifests", extra=["--work", tmp_path / "work"])
    message = all_output(run_cli(args, expect=1))
    assert "pid 4242 on builder-7.example" in message and "--break-lock" in message
    assert store.names() == [LOCK_NAME]

    message = all_output(run_cli([*args, "--break-lock"]))
    assert "taking over the lock of pid 4242 on builder-7.example" in message
    assert LOCK_NAME not in store.names() and MANIFEST_NAME in store.names()


def test_the_store_lock_is_exclusive_and_names_its_holder(s3, tmp_path):
    store = Store(f"{s3}/locked")
    with StoreLock(store, tmp_path / "a", "datagen build"):
        with pytest.raises(LockedError) as caught, StoreLock(store, tmp_path / "b", "datagen build"):
            pass
        message = str(caught.value)
        assert f"pid {os.getpid()} on {socket.gethostname()}" in message and str((tmp_path / "a").resolve()) in message
        assert json.loads(store.read(LOCK_NAME, 1 << 16))["work"] == str((tmp_path / "a").resolve())
    assert store.size(LOCK_NAME) is None
    store.write_bytes(LOCK_NAME, b"first", exclusive=True)
    with pytest.raises(FileExistsError):  # S3's conditional write: two builds starting together
        store.write_bytes(LOCK_NAME, b"second", exclusive=True)
    assert store.read(LOCK_NAME, 100) == b"first"


def test_a_store_lock_of_a_gone_process_of_this_host_is_taken_over(s3, tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    store = Store(f"{s3}/stale")
    store.write_bytes(LOCK_NAME, json.dumps({"pid": gone.pid, "host": socket.gethostname(),
                                             "work": "/elsewhere"}).encode())
    heard = []
    with StoreLock(store, tmp_path / "work", "datagen build", log=heard.append):
        assert json.loads(store.read(LOCK_NAME, 1 << 16))["pid"] == os.getpid()
    assert any(f"pid {gone.pid} no longer runs" in line for line in heard), heard
    assert store.size(LOCK_NAME) is None


# -- what cannot be written ------------------------------------------------------------------------

@pytest.mark.parametrize("spec", ["http://127.0.0.1:1/sets/x", "ftp://example.org/x", "pipe:cat > /tmp/x"])
def test_a_url_that_cannot_be_written_is_refused_before_any_work(spec, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    result = run_cli(build_args(spec, manifests=tmp_path / "manifests"), expect=2)
    message = all_output(result)
    assert "Invalid value for '--out'" in message and "Traceback" not in message, message
    assert not (tmp_path / "cache").exists() and not (tmp_path / "manifests").exists()
    spec_coco = SourceSpec("coco", {"root": SAMPLE_ROOT.resolve(), "split": "train2017"})
    with pytest.raises(BuildError, match="--out "):
        build(BuildConfig(style="none"), spec_coco, 2, spec, manifests_dir=tmp_path / "manifests")
    assert not (tmp_path / "cache").exists() and not (tmp_path / "manifests").exists()


# -- on a cluster ----------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Port .* is already in use:UserWarning")
def test_a_cluster_build_into_a_bucket_is_the_local_build_byte_for_byte(reference, s3, tmp_path):
    """Dask worker processes (which inherit the test's AWS_* environment) build the shards and
    upload each one themselves; the work folder, with the bank, is the folder they share."""
    distributed = pytest.importorskip("distributed")
    url, work = f"{s3}/cluster", tmp_path / "work"
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster:
        run_cli(build_args(url, manifests=tmp_path / "manifests",
                           extra=["--work", work, "--scheduler", cluster.scheduler_address]))
    assert store_files(url) == output_files(reference)
    assert shards_in_transit(work) == []
