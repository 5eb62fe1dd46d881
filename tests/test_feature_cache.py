"""The retrieval feature cache (``trainer.retrieval.cache``): float16 rows on disk, reused across
runs, resumable after a kill, damage found and recomputed, one writer at a time, memory-mapped."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from datagen.format.locking import LockedError
from trainer.retrieval.cache import (
    FEATURES_NAME,
    META_NAME,
    RECORD,
    STATE_NAME,
    FeatureCache,
    FeatureCacheWarning,
    cache_key,
    fill,
    image_id,
)

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (4, 2, 3)
N = 12
KEY = {"backbone_sha256": "ab" * 32, "width": 32, "height": 48, "resize": "squash"}
IDS = [f"image-{i:02d}" for i in range(N)]
ROW_BYTES = int(np.prod(SHAPE)) * 2


def features(rows, shape=SHAPE) -> np.ndarray:
    """Deterministic float32 features of ``rows`` (what a backbone would compute)."""
    return np.stack([np.random.default_rng(int(r)).uniform(-1, 1, shape) for r in rows]).astype(np.float32)


class Counting:
    """A ``compute`` that records the rows it is asked for; ``fail_after`` batches, it raises."""

    def __init__(self, fail_after: int | None = None):
        self.calls: list[list[int]] = []
        self.fail_after = fail_after

    def __call__(self, rows):
        if self.fail_after is not None and len(self.calls) == self.fail_after:
            raise KeyboardInterrupt("simulated kill")
        self.calls.append(list(rows))
        return features(rows)

    @property
    def rows(self) -> list[int]:
        return sorted(r for call in self.calls for r in call)


def open_cache(root, key=KEY, ids=IDS, shape=SHAPE) -> FeatureCache:
    return FeatureCache.open(root, key, ids, shape)


def reference_bytes() -> bytes:
    return features(range(N)).astype(np.float16).tobytes()


def no_cache_warnings(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, FeatureCacheWarning)]


def test_put_get_round_trip_and_reuse_across_opens(tmp_path):
    torch = pytest.importorskip("torch")
    cache = open_cache(tmp_path)
    assert cache.missing.tolist() == list(range(N)) and not cache.folder.exists()  # opening writes nothing
    cache.put([3, 1], features([3, 1]))
    cache.put([5], torch.from_numpy(features([5])))  # torch input, converted the same way
    np.testing.assert_array_equal(cache.get([1, 3, 5, 3]), features([1, 3, 5, 3]).astype(np.float16))
    assert cache.get([1]).dtype == np.float16 and cache.get([1]).shape == (1, *SHAPE)
    with pytest.raises(KeyError, match="not computed"):
        cache.get([0])
    cache.close()

    again = open_cache(tmp_path)
    assert again.folder == cache.folder and sorted(set(range(N)) - set(again.missing.tolist())) == [1, 3, 5]
    np.testing.assert_array_equal(again.get([5]), features([5]).astype(np.float16))
    compute = Counting()
    stats = fill(again, compute, batch=4, progress=False)
    assert compute.rows == sorted(set(range(N)) - {1, 3, 5})
    assert stats["computed"] == N - 3 and stats["reused"] == 3 and stats["damaged"] == 0
    assert again.get(range(N)).tobytes() == reference_bytes()
    compute = Counting()
    assert fill(open_cache(tmp_path), compute, progress=False)["reused"] == N and compute.calls == []

    meta = json.loads((cache.folder / META_NAME).read_text())
    assert meta["feature_shape"] == list(SHAPE) and meta["image_ids"] == IDS and meta["dtype"] == "float16"
    assert (cache.folder / FEATURES_NAME).stat().st_size == N * ROW_BYTES
    assert (cache.folder / STATE_NAME).stat().st_size % RECORD.size == 0


def test_bad_puts_are_refused(tmp_path):
    cache = open_cache(tmp_path)
    with pytest.raises(ValueError, match="shape"):
        cache.put([0], features([0, 1]))
    with pytest.raises(ValueError, match="NaN"):
        cache.put([0], np.full((1, *SHAPE), np.nan, np.float32))
    with pytest.raises(ValueError, match="beyond float16"):
        cache.put([0], np.full((1, *SHAPE), 1e6, np.float32))
    with pytest.raises(IndexError):
        cache.put([N], features([0]))
    assert cache.missing.tolist() == list(range(N))


def test_another_key_or_an_edited_image_is_another_cache(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        (images / f"{i}.jpg").write_bytes(f"image {i}".encode())
    ids = [image_id(images / f"{i}.jpg") for i in range(3)]
    assert ids[0] == hashlib.sha256(b"image 0").hexdigest()
    root = tmp_path / "cache"
    fill(open_cache(root, ids=ids), Counting(), progress=False)

    (images / "0.jpg").rename(images / "renamed.jpg")  # moved: same content, same cache, all reused
    moved = [image_id(images / "renamed.jpg")] + ids[1:]
    assert open_cache(root, ids=moved).missing.size == 0
    (images / "1.jpg").write_bytes(b"edited")  # edited: another cache, nothing reused
    edited = open_cache(root, ids=[moved[0], image_id(images / "1.jpg"), moved[2]])
    assert edited.folder != open_cache(root, ids=ids).folder and edited.missing.tolist() == [0, 1, 2]
    other_key = open_cache(root, key={**KEY, "width": 64}, ids=ids)
    other_shape = open_cache(root, ids=ids, shape=(4, 3, 2))
    assert other_key.missing.size == 3 and other_shape.missing.size == 3
    assert len({c.folder for c in (edited, other_key, other_shape, open_cache(root, ids=ids))}) == 4


def test_rows_of_another_image_list_are_copied_from_its_cache_when_sound(tmp_path):
    root = tmp_path / "cache"
    first = open_cache(root)
    fill(first, Counting(), progress=False)
    # a byte flipped in image-04's row of the first cache: that row must not be copied
    with open(first.folder / FEATURES_NAME, "r+b") as handle:
        handle.seek(4 * ROW_BYTES + 5)
        byte = handle.read(1)
        handle.seek(4 * ROW_BYTES + 5)
        handle.write(bytes([byte[0] ^ 0xFF]))
    ids = ["image-07", "image-04", "new-image", "image-02"]  # another list, order and a new image
    second = open_cache(root, ids=ids)
    assert second.folder != first.folder and second.missing.tolist() == [0, 1, 2, 3]
    compute = Counting()
    stats = fill(second, compute, batch=2, progress=False)
    assert stats["copied"] == 2 and stats["computed"] == 2 and compute.rows == [1, 2]
    np.testing.assert_array_equal(second.get([0, 3]), features([7, 2]).astype(np.float16))
    other_key = open_cache(root, key={**KEY, "width": 64}, ids=ids)
    assert fill(other_key, Counting(), progress=False)["copied"] == 0  # features of another key are never copied


def test_cache_key_names_the_weights():
    torch = pytest.importorskip("torch")
    record = {"source": "/w/moco.pth.tar", "format": "moco_v2", "sha256": "cd" * 32}
    key = cache_key(record, 640, 480, "squash")
    assert key["backbone_sha256"] == "cd" * 32 and (key["width"], key["height"]) == (640, 480)
    json.dumps(key)
    random_record = {"source": "random", "format": "random", "sha256": None}
    with pytest.raises(ValueError, match="backbone="):
        cache_key(random_record, 640, 480, "squash")
    torch.manual_seed(0)
    one = torch.nn.Linear(3, 2)
    same = cache_key(random_record, 640, 480, "squash", backbone=one)
    assert same == cache_key(random_record, 640, 480, "squash", backbone=one)
    assert same != cache_key(random_record, 640, 480, "squash", backbone=torch.nn.Linear(3, 2))


def test_an_interrupted_fill_resumes_with_the_missing_rows_only(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        fill(open_cache(tmp_path), Counting(fail_after=2), batch=3, progress=False)
    cache = open_cache(tmp_path)
    assert cache.missing.tolist() == list(range(6, N))
    compute = Counting()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        stats = fill(cache, compute, batch=3, progress=False)
    assert no_cache_warnings(record) == []
    assert compute.rows == list(range(6, N)) and stats["computed"] == 6 and stats["reused"] == 6
    assert cache.get(range(N)).tobytes() == reference_bytes()


FILL_SCRIPT = """
import hashlib, json, os, sys, time
import numpy as np
from trainer.retrieval.cache import FeatureCache, fill
root, log, pause, gate = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[5]
shape, ids, key = (4, 2, 3), [f"image-{i:02d}" for i in range(12)], json.loads(sys.argv[4])

def compute(rows):
    with open(log, "a") as handle:
        handle.write(" ".join(map(str, rows)) + "\\n")
    deadline = time.monotonic() + 60
    while gate and not os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(pause)
    return np.stack([np.random.default_rng(int(r)).uniform(-1, 1, shape) for r in rows]).astype(np.float32)

cache = FeatureCache.open(root, key, ids, shape)
stats = fill(cache, compute, batch=2, progress=False)
print(json.dumps({"stats": stats, "sha256": hashlib.sha256(cache.get(range(12)).tobytes()).hexdigest()}))
"""


def start_fill(root, log, pause: float = 0.0, gate: Path | None = None, stderr=subprocess.PIPE) -> subprocess.Popen:
    """``fill`` in another process; its ``compute`` logs each batch to ``log``, then waits until
    ``gate`` exists (if given) and ``pause`` seconds."""
    return subprocess.Popen([sys.executable, "-c", FILL_SCRIPT, str(root), str(log), str(pause), json.dumps(KEY),
                             str(gate or "")], cwd=ROOT, stdout=subprocess.PIPE, stderr=stderr, text=True)


def logged_batches(log: Path) -> list[list[int]]:
    if not log.exists():
        return []
    return [list(map(int, line.split())) for line in log.read_text().splitlines() if line.strip()]


def wait_for(condition, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def test_kill_9_mid_fill_then_a_rerun_completes_with_the_same_bytes(tmp_path):
    log = tmp_path / "computed.log"
    process = start_fill(tmp_path / "cache", log, pause=0.2)
    try:
        wait_for(lambda: len(logged_batches(log)) >= 3 or process.poll() is not None, "three batches")
        assert process.poll() is None, process.communicate()
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.kill()
        process.communicate()
    assert process.returncode == -signal.SIGKILL
    started = logged_batches(log)
    cache = open_cache(tmp_path / "cache")
    done = sorted(set(range(N)) - set(cache.missing.tolist()))
    # the batches before the last one logged were stored; the last one may or may not have been
    assert {r for batch in started[:-1] for r in batch} <= set(done) <= {r for batch in started for r in batch}
    compute = Counting()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        stats = fill(cache, compute, batch=2, progress=False)
    assert no_cache_warnings(record) == []
    assert compute.rows == sorted(set(range(N)) - set(done)) and stats["reused"] == len(done)
    assert cache.get(range(N)).tobytes() == reference_bytes()
    uninterrupted = open_cache(tmp_path / "other")
    fill(uninterrupted, Counting(), batch=5, progress=False)
    assert (cache.folder / FEATURES_NAME).read_bytes() == (uninterrupted.folder / FEATURES_NAME).read_bytes()


def test_two_processes_filling_one_cache_compute_each_row_once(tmp_path):
    logs, gate = [tmp_path / "first.log", tmp_path / "second.log"], tmp_path / "go"
    first = start_fill(tmp_path / "cache", logs[0], gate=gate)  # holds the lock until the gate opens
    try:
        wait_for(lambda: logged_batches(logs[0]) or first.poll() is not None, "the first fill to start")
        with open(tmp_path / "second.err", "w") as err:
            second = start_fill(tmp_path / "cache", logs[1], stderr=err)
            try:
                wait_for(lambda: "waiting for" in (tmp_path / "second.err").read_text() or second.poll() is not None,
                         "the second fill to wait")
            finally:
                gate.touch()
            outputs = [first.communicate(timeout=60)[0], second.communicate(timeout=60)[0]]
    finally:
        gate.touch()
        first.kill()
    waited = (tmp_path / "second.err").read_text()
    assert first.returncode == 0 and second.returncode == 0, (outputs, waited)
    computed = sorted(r for log in logs for batch in logged_batches(log) for r in batch)
    assert computed == list(range(N))  # every row exactly once, over both processes
    results = [json.loads(out.strip().splitlines()[-1]) for out in outputs]
    assert results[0]["sha256"] == results[1]["sha256"] == hashlib.sha256(reference_bytes()).hexdigest()
    assert results[1]["stats"]["computed"] == 0 and results[1]["stats"]["reused"] == N
    assert f"waiting for pid {first.pid}" in waited and waited.count("waiting for") == 1, waited


def test_a_second_writer_in_the_same_process_is_refused_not_deadlocked(tmp_path):
    one, two = open_cache(tmp_path), open_cache(tmp_path)
    with one.writing():
        with pytest.raises(LockedError, match="this process"):
            two.put([0], features([0]))
        one.put([0], features([0]))
    two.put([1], features([1]))  # once released, it writes
    assert open_cache(tmp_path).missing.tolist() == list(range(2, N))


def test_a_write_that_fails_midway_leaves_its_rows_not_done(tmp_path, monkeypatch):
    """Rows are recorded done only after their bytes are written and synced; a row written again
    is recorded not done first (a full disk or a kill in between never leaves stale rows done)."""
    import trainer.retrieval.cache as module

    cache = open_cache(tmp_path)
    cache.put([0, 1], features([0, 1]))
    written = []
    real = module._pwrite_all

    def failing(fd, data, offset):
        if written:
            raise OSError(28, "No space left on device")
        written.append(offset)
        real(fd, data, offset)

    monkeypatch.setattr(module, "_pwrite_all", failing)
    with pytest.raises(OSError, match="No space"):
        cache.put([1, 2], -features([1, 2]))  # row 1 again (with other values), then row 2
    monkeypatch.undo()
    again = open_cache(tmp_path)
    assert again.missing.tolist() == list(range(1, N)) and written == [1 * ROW_BYTES]
    np.testing.assert_array_equal(again.get([0]), features([0]).astype(np.float16))
    assert again.verify() == []


def test_a_complete_cache_is_read_and_verified_without_the_lock(tmp_path):
    cache = open_cache(tmp_path)
    fill(cache, Counting(), progress=False)
    writer = open_cache(tmp_path)
    with writer.writing():  # a writer holds the lock: a reader neither waits nor fails
        reader = open_cache(tmp_path)
        assert fill(reader, Counting(), progress=False)["reused"] == N
        assert reader.get(range(N)).tobytes() == reference_bytes()


def filled(root) -> FeatureCache:
    cache = open_cache(root)
    fill(cache, Counting(), batch=5, progress=False)
    return cache


def test_a_flipped_byte_in_a_done_row_is_found_and_only_that_row_recomputed(tmp_path):
    cache = filled(tmp_path)
    path = cache.folder / FEATURES_NAME
    with open(path, "r+b") as handle:
        handle.seek(7 * ROW_BYTES + 5)
        byte = handle.read(1)
        handle.seek(7 * ROW_BYTES + 5)
        handle.write(bytes([byte[0] ^ 0x10]))
    assert open_cache(tmp_path).verify() == [7]
    assert open_cache(tmp_path).missing.tolist() == [7]
    compute = Counting()
    stats = fill(open_cache(tmp_path), compute, progress=False)
    assert compute.rows == [7] and stats["computed"] == 1 and stats["reused"] == N - 1
    assert open_cache(tmp_path).get(range(N)).tobytes() == reference_bytes()

    with open(path, "r+b") as handle:  # again, found by fill alone this time
        handle.seek(2 * ROW_BYTES)
        handle.write(b"\x00\x7c")  # +inf
    compute = Counting()
    stats = fill(open_cache(tmp_path), compute, progress=False)
    assert compute.rows == [2] and stats["damaged"] == 1
    assert path.read_bytes() == reference_bytes()


def test_a_truncated_features_file_is_resized_and_only_the_lost_rows_recomputed(tmp_path):
    cache = filled(tmp_path)
    path = cache.folder / FEATURES_NAME
    os.truncate(path, 4 * ROW_BYTES + 10)
    reader = open_cache(tmp_path)
    assert reader.missing.tolist() == list(range(N))  # a damaged cache shows nothing done to a reader
    with pytest.raises(KeyError):
        reader.get([0])
    compute = Counting()
    with pytest.warns(FeatureCacheWarning, match=FEATURES_NAME):
        stats = fill(reader, compute, progress=False)
    assert compute.rows == list(range(4, N)) and stats["reused"] == 4 and stats["damaged"] == N - 4
    assert path.read_bytes() == reference_bytes()


def test_a_longer_features_file_is_cut_back(tmp_path):
    path = filled(tmp_path).folder / FEATURES_NAME
    with open(path, "ab") as handle:
        handle.write(b"junk")
    compute = Counting()
    with pytest.warns(FeatureCacheWarning, match=FEATURES_NAME):
        fill(open_cache(tmp_path), compute, progress=False)
    assert compute.rows == [] and path.read_bytes() == reference_bytes()


@pytest.mark.parametrize("garbage", [b"{not json", b"[]", json.dumps({"format": "segswap-feature-cache"}).encode()])
def test_a_garbled_meta_json_rebuilds_the_cache(tmp_path, garbage):
    cache = filled(tmp_path)
    (cache.folder / META_NAME).write_bytes(garbage)
    assert open_cache(tmp_path).missing.tolist() == list(range(N))
    compute = Counting()
    with pytest.warns(FeatureCacheWarning, match=META_NAME):
        fill(open_cache(tmp_path), compute, progress=False)
    assert compute.rows == list(range(N))
    assert json.loads((cache.folder / META_NAME).read_text())["image_ids"] == IDS
    assert open_cache(tmp_path).get(range(N)).tobytes() == reference_bytes()


def test_a_garbled_state_file_keeps_the_rows_it_can_vouch_for(tmp_path):
    cache = filled(tmp_path)
    state = cache.folder / STATE_NAME
    data = bytearray(state.read_bytes())
    assert len(data) == N * RECORD.size
    rows = [RECORD.unpack_from(data, i * RECORD.size)[0] for i in range(N)]
    garbled = rows.index(9)
    data[garbled * RECORD.size + 12] ^= 0xFF  # the record of row 9 no longer checks
    state.write_bytes(bytes(data) + b"torn")  # and a torn record at the end
    assert open_cache(tmp_path).missing.tolist() == list(range(N))
    compute = Counting()
    with pytest.warns(FeatureCacheWarning, match=STATE_NAME):
        stats = fill(open_cache(tmp_path), compute, progress=False)
    assert compute.rows == [9] and stats["reused"] == N - 1
    assert state.stat().st_size == N * RECORD.size
    assert open_cache(tmp_path).get(range(N)).tobytes() == reference_bytes()

    state.unlink()  # without any record nothing can be vouched for
    compute = Counting()
    with pytest.warns(FeatureCacheWarning, match=STATE_NAME):
        fill(open_cache(tmp_path), compute, progress=False)
    assert compute.rows == list(range(N))


def test_a_state_file_from_another_cache_vouches_for_nothing(tmp_path):
    cache = filled(tmp_path)
    other = open_cache(tmp_path, key={**KEY, "resize": "pad"})
    fill(other, Counting(), progress=False)
    shutil.copy(cache.folder / STATE_NAME, other.folder / STATE_NAME)  # records keyed by the cache's id
    compute = Counting()
    with pytest.warns(FeatureCacheWarning, match=STATE_NAME):
        fill(open_cache(tmp_path, key={**KEY, "resize": "pad"}), compute, progress=False)
    assert compute.rows == list(range(N))


MEMORY_SCRIPT = """
import json, sys
import numpy as np
from trainer.retrieval.cache import FeatureCache

def peak_kb():  # this process's peak resident memory (VmHWM starts afresh at exec, unlike ru_maxrss)
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) for line in handle if line.startswith("VmHWM:"))

cache = FeatureCache.open(sys.argv[1], {"k": 1}, [f"i{i}" for i in range(1024)], (64, 32, 32))
assert cache.missing.size == 0
before = peak_kb()
rows = cache.get([3, 500, 1023])
after_get = peak_kb()
damaged = cache.verify()
after_verify = peak_kb()
print(json.dumps({"get_kb": after_get - before, "verify_kb": after_verify - after_get, "shape": rows.shape,
                  "sum": float(rows.astype(np.float32).sum()), "damaged": damaged,
                  "memmap": isinstance(cache._mapping(), np.memmap)}))
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the peak memory from /proc (Linux)")
def test_reading_a_few_rows_or_verifying_does_not_load_the_whole_file(tmp_path):
    """A 128 MB cache: get() of 3 rows and verify() (which reads every row) stay far below it."""
    shape = (64, 32, 32)  # 128 KiB a row
    cache = FeatureCache.open(tmp_path, {"k": 1}, [f"i{i}" for i in range(1024)], shape)
    fill(cache, lambda rows: np.broadcast_to(np.float32(0.5) + np.array(rows, np.float32)[:, None, None, None] / 4096,
                                             (len(rows), *shape)), batch=64, progress=False)
    assert (cache.folder / FEATURES_NAME).stat().st_size == 128 << 20
    run = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(tmp_path)], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert result["shape"] == [3, *shape] and result["memmap"] and result["damaged"] == []
    expected = sum(float(np.float16(0.5 + r / 4096)) for r in (3, 500, 1023)) * np.prod(shape)
    assert result["sum"] == pytest.approx(expected, rel=1e-6)
    assert result["get_kb"] < 16 << 10 and result["verify_kb"] < 16 << 10, result  # KiB, vs 128 MiB
