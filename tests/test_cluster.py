"""``datagen build --scheduler``: shard tasks on a real Dask cluster (``distributed.LocalCluster``,
worker processes on loopback) give the bytes of a local build, survive a killed worker, retry
then list a failing shard, and count progress across workers."""
from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import dask
import pytest
from cluster_helpers import ATTEMPTS_LOG, FAILING_SHARD, FailingShardTask, attempt_together
from conftest import REFERENCE_N, REFERENCE_SHARD_SIZE, REFERENCE_SHARDS, all_output, build_args, output_files, run_cli
from distributed import Client, LocalCluster

import datagen.runner.run as run_module
from datagen.cli import SAMPLE_ROOT
from datagen.config import BuildConfig
from datagen.format.shards import shard_name
from datagen.runner.dask_distributor import DaskDistributor, _Events, _Throttle, run_attempt
from datagen.runner.distribute import CLUSTER_STAGING_DIR
from datagen.runner.errors import BuildError
from datagen.runner.run import SourceSpec, StyleOptions, StyleSpec, build
from datagen.runner.task import ShardTask

pytestmark = pytest.mark.filterwarnings("ignore:Port .* is already in use:UserWarning")  # the scheduler's HTTP port


def local_cluster(workers: int = 2, threads: int = 1, daemon: bool = True) -> LocalCluster:
    """Worker processes on loopback, each with a nanny that restarts it when it dies; ``daemon``:
    Dask's default; False lets a worker start processes (its pool)."""
    with dask.config.set({"distributed.worker.daemon": daemon}):
        return LocalCluster(n_workers=workers, threads_per_worker=threads, processes=True, dashboard_address=None)


@pytest.fixture(scope="module")
def cluster():
    """Two one-thread workers, as CPU machines run them (shared by the tests that do not kill one)."""
    with local_cluster() as cluster:
        yield cluster


def coco_spec() -> SourceSpec:
    return SourceSpec("coco", {"root": SAMPLE_ROOT.resolve(), "split": "train2017"})


def assert_same_outputs(got: Path, want: Path) -> None:
    got_files, want_files = output_files(got), output_files(want)
    assert sorted(got_files) == sorted(want_files)
    different = [name for name in want_files if got_files[name] != want_files[name]]
    assert not different, f"{got} differs from {want} in {different}"


def assert_clean(out: Path) -> None:
    """No staging folder and no temporary file left in ``out``."""
    assert not (out / CLUSTER_STAGING_DIR).exists()
    assert not sorted(out.rglob("*.tmp"))


def reference_tasks(reference: Path, out: Path, task_class=ShardTask) -> list[ShardTask]:
    """The shard tasks of the reference command, writing into ``out`` (its bank stays read only)."""
    manifest = json.loads((reference / "manifest.json").read_text())
    config = BuildConfig(shard_size=REFERENCE_SHARD_SIZE, style="none")
    return [task_class(k, REFERENCE_SHARD_SIZE, config, str(reference / "bank"), manifest["inputs"]["image_root"],
                       0, str(out), manifest["inputs"]["inputs_sha256"]) for k in range(REFERENCE_SHARDS)]


# -- without a cluster -------------------------------------------------------------------------

def test_datagen_imports_distributed_only_for_a_cluster_build():
    code = ("import sys\nfrom click.testing import CliRunner\nfrom datagen.cli import main\n"
            "import datagen.runner.run\n"
            "assert CliRunner().invoke(main, ['build', '--help']).exit_code == 0\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('distributed', 'dask')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_build_help_describes_the_scheduler_option():
    output = run_cli(["build", "--help"]).output
    assert "--scheduler ADDRESS" in output and "same path" in output and "--workers is ignored" in output


def test_an_unreachable_scheduler_is_an_error_before_any_work(tmp_path):
    out = tmp_path / "out"
    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
        result = run_cli(build_args(out, extra=["--scheduler", "tcp://127.0.0.1:1"]), expect=1)
    assert "cannot reach the Dask scheduler" in all_output(result)
    assert not (out / "bank").exists()


def test_progress_counts_each_shard_once_whatever_its_attempts():
    updates = []
    events = _Events(updates.append, log=None)
    for shard, done in [(0, 2), (1, 3), (0, 4), (0, 1), (0, 3), (0, 5), (1, 3)]:  # shard 0 restarted at 1
        events.event((0.0, {"shard": shard, "done": done}))
    events.reached(1, 5)  # the client's top-up when shard 1's future is done
    assert updates == [2, 3, 2, 1, 2] and sum(updates) == 10


def test_a_worker_sends_its_counts_throttled():
    sent = []
    throttle = _Throttle(sent.append, every=4)
    for _ in range(10):
        throttle(1)
    throttle.flush()
    assert sent[-1] == 10 and sent == sorted(sent) and len(sent) <= 4  # every 4 pairs, or 0.5 s, and the rest


@pytest.mark.slow
def test_overlapping_attempts_of_one_shard_leave_the_same_complete_shard(reference, tmp_path):
    """Two attempts of one shard at once (a worker the scheduler took for dead still writing):
    each writes its own folder and renames identical bytes; an attempt whose build is over (its
    staging folder removed) publishes nothing."""
    out = tmp_path / "out"
    staging = out / CLUSTER_STAGING_DIR / "run"
    staging.mkdir(parents=True)
    task = reference_tasks(reference, out)[2]
    context = multiprocessing.get_context("spawn")
    barrier, queue = context.Barrier(2), context.Queue()
    attempts = [context.Process(target=attempt_together, args=(task, str(staging), barrier, queue)) for _ in range(2)]
    for process in attempts:
        process.start()
    results = [queue.get(timeout=120) for _ in attempts]
    for process in attempts:
        process.join()
    assert len(results) == 2 and results[0] == results[1]
    names = [shard_name(2), "shard-000002.samples.parquet", "shard-000002.stats.json"]
    assert sorted(p.name for p in out.glob("shard-*")) == sorted(names)
    assert all((out / name).read_bytes() == (reference / name).read_bytes() for name in names)
    assert not list(staging.iterdir())

    late = reference_tasks(reference, tmp_path / "after")[0]
    (tmp_path / "after").mkdir()
    shutil.rmtree(out / CLUSTER_STAGING_DIR)
    with pytest.raises(FileNotFoundError):
        run_attempt(late, staging, lambda staged: staged())
    assert not list((tmp_path / "after").iterdir())


# -- on a cluster ------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_cluster_build_gives_the_bytes_of_a_local_build(reference, cluster, tmp_path):
    out = tmp_path / "out"
    result = run_cli(build_args(out, workers=3, extra=["--scheduler", cluster.scheduler_address]))
    assert "--workers is ignored" in all_output(result)
    assert "cluster tcp://127.0.0.1" in all_output(result)
    assert_same_outputs(out, reference)  # tars, per-sample parquet, stats and manifest.json
    assert_clean(out)


@pytest.mark.slow
def test_progress_counts_the_pairs_of_every_worker(reference, cluster, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    updates = []
    tasks = reference_tasks(reference, out)
    stats = DaskDistributor(cluster.scheduler_address, log=lambda message: None).run(tasks, updates.append)
    assert sorted(s["shard"] for s in stats) == list(range(REFERENCE_SHARDS))
    assert sum(updates) == REFERENCE_N and all(k > 0 for k in updates)
    assert len(updates) > REFERENCE_SHARDS  # the workers' counts arrived while shards were built
    for name in (p.name for p in reference.glob("shard-*")):
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name
    assert_clean(out)


@pytest.mark.slow
def test_a_shard_failing_on_every_attempt_is_retried_then_listed_and_the_rest_kept(reference, cluster, tmp_path,
                                                                                    monkeypatch):
    out = tmp_path / "out"
    args = build_args(out, extra=["--scheduler", cluster.scheduler_address])
    with monkeypatch.context() as patch:
        patch.setattr(run_module, "ShardTask", FailingShardTask)  # the build's tasks, pickled to the workers
        result = run_cli(args, expect=1)
    output = all_output(result)
    assert f"1 of {REFERENCE_SHARDS} shards failed after 3 attempts each" in output
    assert f"{shard_name(FAILING_SHARD)}: RuntimeError: broken on purpose" in output
    assert len((out / ATTEMPTS_LOG).read_text().splitlines()) == 3  # the first attempt and two retries
    assert not (out / "manifest.json").exists() and not (out / shard_name(FAILING_SHARD)).exists()
    for k in set(range(REFERENCE_SHARDS)) - {FAILING_SHARD}:
        assert (out / shard_name(k)).read_bytes() == (reference / shard_name(k)).read_bytes()
    assert_clean(out)

    (out / ATTEMPTS_LOG).unlink()
    rerun = run_cli(args)  # the failed shard only, then the manifest
    assert f"resuming: {REFERENCE_SHARDS - 1} of {REFERENCE_SHARDS} shards already complete" in all_output(rerun)
    assert_same_outputs(out, reference)


@pytest.mark.slow
def test_a_worker_killed_mid_build_still_ends_with_a_complete_identical_set(tmp_path):
    n, shard_size = 150, 5
    local = tmp_path / "local"
    run_cli(build_args(local, n=n, shard_size=shard_size))
    out = tmp_path / "cluster"
    with local_cluster() as cluster, Client(cluster, set_as_default=False) as client:
        pids = client.run(os.getpid)
        errors = []

        def cluster_build():
            try:
                build(BuildConfig(shard_size=shard_size, style="none"), coco_spec(), n, out, show_progress=False,
                      manifests_dir=tmp_path / "manifests", log=lambda message: None,
                      distributor=DaskDistributor(cluster.scheduler_address))
            except BaseException as error:  # noqa: BLE001 - re-raised in the test's thread
                errors.append(error)

        builder = threading.Thread(target=cluster_build)
        builder.start()
        deadline = time.monotonic() + 120
        while len(list(out.glob("shard-*.stats.json"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        done_at_kill = len(list(out.glob("shard-*.stats.json")))
        address, victim = sorted(pids.items())[0]
        running = client.processing(workers=[address])[address]
        os.kill(victim, signal.SIGKILL)  # the nanny starts a new worker; its tasks go elsewhere
        builder.join(timeout=300)
        assert not builder.is_alive() and not errors, errors
        assert done_at_kill < n // shard_size and running  # killed mid-build, with shards in hand
        assert victim not in client.run(os.getpid).values()
    assert_same_outputs(out, local)
    assert_clean(out)


@pytest.mark.slow
def test_a_worker_with_threads_builds_in_a_pool_served_by_one_stylizer(tmp_path):
    """A GPU machine's worker (one process, several threads) on the CPU: its pool's processes
    send their pairs to the worker's one stylizer (forced on: 'color' is a CPU stylizer); the
    bytes are those of a local build."""
    styles = tmp_path / "styles"
    styles.mkdir()
    for path in sorted((SAMPLE_ROOT / "train2017").glob("*.jpg"))[:2]:
        shutil.copy(path, styles / path.name)
    config = BuildConfig(shard_size=REFERENCE_SHARD_SIZE, style="color")
    style = StyleSpec(StyleOptions(style_dir=styles))
    local, out = tmp_path / "local", tmp_path / "cluster"
    build(config, coco_spec(), REFERENCE_N, local, style=style, show_progress=False, log=lambda message: None,
          manifests_dir=tmp_path / "manifests")
    logged = []
    with local_cluster(workers=1, threads=2, daemon=False) as cluster:
        build(config, coco_spec(), REFERENCE_N, out, style=style, show_progress=False, log=logged.append,
              manifests_dir=tmp_path / "manifests",
              distributor=DaskDistributor(cluster.scheduler_address, style_server=True, log=logged.append))
    assert any("shards in a pool of 2 processes; one stylizer on" in line for line in logged), logged
    assert_same_outputs(out, local)
    assert_clean(out)


@pytest.mark.slow
def test_a_daemonic_worker_with_threads_says_how_to_start_it(reference, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with local_cluster(workers=1, threads=2) as cluster, pytest.raises(BuildError) as failure:
        DaskDistributor(cluster.scheduler_address, retries=0, log=lambda message: None).run(
            reference_tasks(reference, out)[:1], lambda k: None)
    assert "DASK_DISTRIBUTED__WORKER__DAEMON=False" in str(failure.value)
    assert "shard-000000.tar" in str(failure.value)


@pytest.mark.slow
def test_a_pooled_worker_builds_in_its_pool_and_closes_it_when_idle(reference, tmp_path, monkeypatch):
    """The plugin of a worker with two threads, in this process: the shard is built in its pool
    (the pair counts come back through the queue), and the pool goes after IDLE_SECONDS."""
    from types import SimpleNamespace

    import datagen.runner.dask_distributor as dask_distributor

    monkeypatch.setattr(dask_distributor, "IDLE_SECONDS", 0.2)
    events = []
    worker = SimpleNamespace(address="tcp://fake:1", state=SimpleNamespace(nthreads=2),
                             log_event=lambda topic, message: events.append(message))
    plugin = dask_distributor.ShardPlugin("datagen-shards-test", BuildConfig(shard_size=REFERENCE_SHARD_SIZE,
                                                                              style="none"), StyleSpec())
    plugin.setup(worker)
    counts = []
    try:
        stats = plugin.run(reference_tasks(reference, tmp_path)[0], counts.append)
        assert plugin.pooled and counts[-1] == REFERENCE_SHARD_SIZE and counts == sorted(counts)
        assert stats["sha256"] == json.loads((reference / "shard-000000.stats.json").read_text())["sha256"]
        assert events == [{"worker": "tcp://fake:1", "processes": 2, "served": ""}]
        deadline = time.monotonic() + 10
        while plugin._pool is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert plugin._pool is None and plugin._manager is None
    finally:
        plugin.teardown(worker)
