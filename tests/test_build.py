"""End-to-end tests of ``datagen build``: reproducibility, resume, manifest, verify, reader contract."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import (
    REFERENCE_N,
    REFERENCE_SHARD_SIZE,
    REFERENCE_SHARDS,
    all_output,
    build_args,
    output_files,
    run_cli,
    shard_files,
)

from datagen.cli import SAMPLE_ROOT
from datagen.config import BuildConfig
from datagen.format.hashing import config_hash
from datagen.format.manifest import fingerprint, read_sample_rows, read_stats, samples_name, stats_name
from datagen.format.schema import SCHEMA_VERSION, decode_npy, encode_npy
from datagen.format.shards import ShardWriter, iter_tar_samples, sample_key, sample_sha256, shard_name
from trainer.data import iter_samples


def file_ids(directory: Path, pattern: str) -> dict[str, tuple[int, int]]:
    """(inode, mtime_ns) of each file: changes when a file is rewritten (atomic rename or not)."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(directory.glob(pattern))}


def assert_same_outputs(got: Path, want: Path) -> None:
    got_files, want_files = output_files(got), output_files(want)
    assert sorted(got_files) == sorted(want_files)
    different = [name for name in want_files if got_files[name] != want_files[name]]
    assert not different, f"{got} differs from {want} in {different}"


def assert_no_tmp(directory: Path) -> None:
    leftovers = sorted(str(p.relative_to(directory)) for p in directory.rglob("*.tmp"))
    assert not leftovers, f"temporary files left behind: {leftovers}"


# -- reproducibility ---------------------------------------------------------------------------

@pytest.mark.slow
def test_same_seed_gives_identical_bytes_in_another_dir_even_with_two_workers(reference, tmp_path):
    out = tmp_path / "again"
    run_cli(build_args(out, workers=2))
    assert shard_files(out) == [shard_name(k) for k in range(REFERENCE_SHARDS)]
    assert_same_outputs(out, reference)  # tars, per-sample parquet, stats and manifest.json
    assert_no_tmp(out)


def test_another_seed_gives_other_shards(reference, reference_seed1):
    assert shard_files(reference_seed1) == shard_files(reference)
    for name in shard_files(reference):
        assert (reference / name).read_bytes() != (reference_seed1 / name).read_bytes(), name
    manifest = json.loads((reference_seed1 / "manifest.json").read_text())
    assert manifest["root_seed"] == 1 and manifest["n_samples"] == REFERENCE_N
    assert manifest["fingerprint"] != json.loads((reference / "manifest.json").read_text())["fingerprint"]


# -- resume ------------------------------------------------------------------------------------

@pytest.mark.slow
def test_resume_after_kill_9_equals_uninterrupted_build(reference, tmp_path):
    out = tmp_path / "killed"
    args = build_args(out)
    process = subprocess.Popen([sys.executable, "-m", "datagen.cli", *map(str, args)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    try:
        while not list(out.glob("shard-*.stats.json")):
            assert process.poll() is None, f"build ended before any shard: {process.stderr.read().decode()}"
            assert time.monotonic() < deadline, "no shard finished within 120 s"
            time.sleep(0.005)
        process.kill()  # SIGKILL: no cleanup of any kind
    finally:
        process.kill()
        process.wait()
        process.stderr.close()
    assert process.returncode == -9
    done = shard_files(out, "shard-*.stats.json")
    assert 1 <= len(done) < REFERENCE_SHARDS, f"the build was not interrupted mid-way: {done}"
    assert not (out / "manifest.json").exists()

    result = run_cli(args)
    assert f"resuming: {len(done)} of {REFERENCE_SHARDS} shards already complete" in all_output(result)
    assert_same_outputs(out, reference)
    assert_no_tmp(out)


def children_of(pid: int) -> set[int]:
    """Every live descendant of process ``pid`` (from /proc)."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            parents[int(entry.name)] = int(fields[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def start_build(args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "datagen.cli", *map(str, args)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)


def wait_for_first_shard(process, out: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not list(out.glob("shard-*.stats.json")):
        assert process.poll() is None, f"build ended before any shard: {process.stderr.read().decode()}"
        assert time.monotonic() < deadline, f"no shard finished within {timeout} s"
        time.sleep(0.005)


@pytest.mark.slow
@pytest.mark.parametrize("signal_name", ["SIGKILL", "SIGTERM"])
def test_workers_end_with_their_build_and_the_rerun_equals_an_uninterrupted_build(reference, tmp_path,
                                                                                   signal_name):
    """Only the main process is signalled (as `timeout` or a scheduler does): no worker may go on
    writing shards into a folder that a rerun rebuilds."""
    import signal

    out = tmp_path / "killed"
    args = build_args(out, shard_size=2, workers=2)  # 10 shards of 2 over two worker processes
    process = start_build(args)
    try:
        wait_for_first_shard(process, out)
        workers = children_of(process.pid)
        assert workers, "the build started no worker process"
        process.send_signal(getattr(signal, signal_name))
        process.wait(timeout=60)
        deadline = time.monotonic() + 10
        while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        survivors = [pid for pid in workers if alive(pid)]
        committed = shard_files(out, "shard-*.stats.json")
    finally:
        process.kill()
        process.wait()
        process.stderr.close()
    assert not survivors, f"processes of the build outlived it: {survivors}"
    time.sleep(0.5)
    assert shard_files(out, "shard-*.stats.json") == committed, "a shard was committed after the build ended"
    assert not (out / "manifest.json").exists()
    run_cli(args)
    direct = tmp_path / "direct"
    run_cli(build_args(direct, shard_size=2))
    assert_same_outputs(out, direct)
    assert_no_tmp(out)


def test_a_second_build_on_the_same_folder_stops_at_once_naming_the_first(reference_copy):
    from datagen.runner.lock import OutputLock

    before = file_ids(reference_copy, "shard-*")
    with OutputLock(reference_copy, "datagen build"):
        started = time.monotonic()
        result = run_cli(build_args(reference_copy), expect=1)
        assert time.monotonic() - started < 5
    message = all_output(result)
    assert f"pid {os.getpid()}" in message and "being written by" in message and "Traceback" not in message
    assert file_ids(reference_copy, "shard-*") == before
    run_cli(build_args(reference_copy))  # released: the next build goes ahead


def test_temporary_files_of_a_killed_build_are_removed_by_the_next(reference_copy):
    (reference_copy / (shard_name(9) + ".tmp")).write_bytes(b"half a shard")
    (reference_copy / "manifest.json.tmp").write_bytes(b"{")
    run_cli(build_args(reference_copy))
    assert_no_tmp(reference_copy)


def test_resuming_with_a_current_bank_does_not_load_the_annotations_again(reference, reference_copy, monkeypatch):
    """Parsing COCO's annotations takes a minute: a resume whose bank matches skips it."""
    import datagen.runner.inputs

    (reference_copy / stats_name(2)).unlink()

    def no_loading(*args, **kwargs):
        raise AssertionError("the source was loaded although its bank is current")

    monkeypatch.setattr(datagen.runner.inputs, "get_source", no_loading)
    run_cli(build_args(reference_copy))
    assert_same_outputs(reference_copy, reference)
    (reference_copy / "bank" / "inputs.json").unlink()  # the control: a bank to scan loads the source
    with pytest.raises(AssertionError, match="loaded although its bank is current"):
        run_cli(build_args(reference_copy))


@pytest.mark.parametrize("damage", ["delete_stats_marker", "truncate_tar", "flip_a_byte", "zero_a_run"])
def test_resume_rebuilds_only_unfinished_shards(reference, reference_copy, damage):
    out, broken = reference_copy, 2
    tar = out / shard_name(broken)
    data = bytearray(tar.read_bytes())
    if damage == "delete_stats_marker":
        (out / stats_name(broken)).unlink()
    elif damage == "truncate_tar":  # a tar that does not match its marker (e.g. a disk that lost the tail)
        tar.write_bytes(data[:-4096])
    elif damage == "flip_a_byte":  # same size: only the checksum tells
        data[len(data) // 3] ^= 0x01
        tar.write_bytes(bytes(data))
    else:  # a run of zeros where data was, same size (a damaged disk block)
        data[4096: 4096 + 8192] = bytes(8192)
        tar.write_bytes(bytes(data))
    assert tar.stat().st_size == len(data) or damage == "truncate_tar"
    before = file_ids(out, "shard-*")
    result = run_cli(build_args(out))
    assert f"resuming: {REFERENCE_SHARDS - 1} of {REFERENCE_SHARDS} shards already complete" in all_output(result)
    after = file_ids(out, "shard-*")
    for k in range(REFERENCE_SHARDS):
        for name in (shard_name(k), samples_name(k), stats_name(k)):
            if k == broken:
                assert after[name] != before.get(name), f"{name} was not rebuilt"
            else:
                assert after[name] == before[name], f"{name} of a finished shard was rewritten"
    assert_same_outputs(out, reference)
    assert_no_tmp(out)


@pytest.mark.slow
def test_larger_n_extends_to_the_same_result_as_a_direct_build(tmp_path):
    direct, extended = tmp_path / "direct", tmp_path / "extended"
    run_cli(build_args(direct, n=35, shard_size=10))

    run_cli(build_args(extended, n=15, shard_size=10))  # shard 1 is partial (5 of 10)
    run_cli(build_args(extended, n=20, shard_size=10))  # refills shard 1
    assert (extended / shard_name(1)).read_bytes() == (direct / shard_name(1)).read_bytes()
    kept = file_ids(extended, "shard-00000[01].*")
    result = run_cli(build_args(extended, n=35, shard_size=10))  # adds shards 2 and 3 (5 samples)
    assert "resuming: 2 of 4 shards already complete" in all_output(result)
    assert file_ids(extended, "shard-00000[01].*") == kept
    assert [s["samples"] for s in json.loads((extended / "manifest.json").read_text())["shards"]] == [10, 10, 10, 5]
    assert_same_outputs(extended, direct)
    assert_no_tmp(extended)


def test_a_resumed_build_names_packages_whose_versions_differ_from_the_sets(reference_copy):
    out = reference_copy
    (out / stats_name(3)).unlink()
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["versions"]["opencv"] = "5.0.0.93"
    (out / "manifest.json").write_text(json.dumps(manifest))
    result = run_cli(build_args(out))
    assert "warning: opencv 5.0.0.93 in the set" in all_output(result) and "JPEG" in all_output(result)
    result = run_cli(build_args(out, n=REFERENCE_N + 5))  # the manifest now records this machine's
    assert "opencv 5.0.0.93" not in all_output(result)


def test_refuses_to_mix_builds_unless_overwrite(reference_copy, reference_seed1):
    out = reference_copy
    before = output_files(out)
    for extra in (["--seed", "1"], ["--shard-size", "4"], ["--blend", "paste"]):
        args = build_args(out) + extra  # later options win in click
        result = run_cli(args, expect=1)
        message = all_output(result)
        assert "--overwrite" in message and "another build" in message, message
        assert output_files(out) == before, f"a refused build ({extra}) changed files"

    run_cli(build_args(out, seed=1) + ["--overwrite"])
    assert json.loads((out / "manifest.json").read_text())["root_seed"] == 1
    assert_same_outputs(out, reference_seed1)
    run_cli(build_args(out, seed=1))  # now a finished seed-1 build: the same command is fine


def test_refuses_to_mix_shards_of_other_inputs_unless_overwrite(tmp_path):
    """Same config and seed, other annotations: the old shards must not be kept as if done."""
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    (root / "train2017").symlink_to(SAMPLE_ROOT / "train2017", target_is_directory=True)
    dataset = json.loads((SAMPLE_ROOT / "annotations" / "instances_train2017.json").read_text())
    dataset["annotations"] = [a for a in dataset["annotations"] if a["id"] % 2 == 0]
    (root / "annotations" / "instances_train2017.json").write_text(json.dumps(dataset))
    other = ["--coco-root", str(root)]

    out, direct = tmp_path / "out", tmp_path / "direct"
    run_cli(build_args(out, n=10))  # the embedded sample
    before = output_files(out)
    bank_before = {p.name: p.read_bytes() for p in (out / "bank").iterdir()}
    result = run_cli(build_args(out, n=10) + other, expect=1)
    assert "--overwrite" in all_output(result), all_output(result)
    assert output_files(out) == before
    assert {p.name: p.read_bytes() for p in (out / "bank").iterdir()} == bank_before

    run_cli(build_args(out, n=10) + other + ["--overwrite"])
    run_cli(build_args(direct, n=10) + other)
    assert_same_outputs(out, direct)
    assert all(before[name] != (out / name).read_bytes() for name in shard_files(out))


# -- manifest and per-sample rows -----------------------------------------------------------------

def test_manifest_describes_the_files(reference):
    manifest = json.loads((reference / "manifest.json").read_text())
    assert manifest["schema_version"] == SCHEMA_VERSION
    config = BuildConfig.from_dict(manifest["config"])
    assert config.shard_size == REFERENCE_SHARD_SIZE
    assert manifest["config_hash"] == config_hash(config)
    assert manifest["root_seed"] == 0
    assert manifest["n_requested"] == manifest["n_samples"] == REFERENCE_N
    for package in ("python", "numpy", "opencv", "pyarrow", "scipy", "datagen"):
        assert manifest["versions"].get(package), f"no version of {package}"
    assert [s["name"] for s in manifest["shards"]] == [shard_name(k) for k in range(REFERENCE_SHARDS)]
    for entry in manifest["shards"]:
        path = reference / entry["name"]
        assert entry["bytes"] == path.stat().st_size
        assert entry["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert entry["samples"] == sum(1 for _ in iter_tar_samples(path)) == REFERENCE_SHARD_SIZE
    assert manifest["fingerprint"] == fingerprint(manifest["config_hash"], manifest["shards"])

    copies = list((reference.parent / "out-manifests").iterdir())
    assert [p.name for p in copies] == [f"out-{manifest['fingerprint'][:12]}.json"]
    assert copies[0].read_bytes() == (reference / "manifest.json").read_bytes()


def test_sample_parquet_has_one_row_per_attempt(reference):
    manifest = json.loads((reference / "manifest.json").read_text())
    accepted_total, attempted_total, rejected_total = 0, 0, Counter()
    for k, entry in enumerate(manifest["shards"]):
        stats = read_stats(reference / stats_name(k))
        rows = read_sample_rows(reference / entry["samples_file"])
        assert pq.read_table(reference / entry["samples_file"]).num_rows == len(rows) == stats["attempted"]
        assert [row["attempt"] for row in rows] == list(range(len(rows)))
        accepted = [row for row in rows if row["status"] == "accepted"]
        rejected = [row for row in rows if row["status"] == "rejected"]
        assert len(accepted) + len(rejected) == len(rows)
        assert len(accepted) == stats["samples"] == entry["samples"]
        tar_samples = list(iter_tar_samples(reference / entry["name"]))
        tar_keys = [members["__key__"] for members in tar_samples]
        assert [row["key"] for row in accepted] == tar_keys == [sample_key(k, i) for i in range(len(accepted))]
        assert [row["sha256"] for row in accepted] == [sample_sha256(members) for members in tar_samples]
        for row in accepted:
            assert row["reason"] is None and row["bytes"] > 0
            assert row["source_image_id"] is not None and row["background_image_id"] is not None
            assert len(row["segment_ids"]) == len(row["category_ids"]) == row["objects"]
        for row in rejected:
            assert row["key"] is None and row["reason"] and row["sha256"] is None, row
        assert Counter(row["reason"].split(":")[0] for row in rejected) == Counter(stats["rejected"])
        accepted_total += len(accepted)
        attempted_total += len(rows)
        rejected_total.update(stats["rejected"])
    assert accepted_total == REFERENCE_N
    assert attempted_total == manifest["n_attempted"]
    assert dict(rejected_total) == manifest["rejected"]


def test_a_mixed_build_is_half_one_object_and_half_two_object_pairs_in_every_shard(reference):
    """--objects mix (the default): sample i of a shard has one object when i is even, two when it
    is odd, in the tar and in the per-attempt rows: shards of 5 hold 3 and 2, whatever share of
    the attempts of each kind was rejected."""
    manifest = json.loads((reference / "manifest.json").read_text())
    assert manifest["config"]["objects"] == "mix"
    counts = Counter()
    for entry in manifest["shards"]:
        samples = list(iter_samples(reference / entry["name"]))
        objects = [len(sample.meta["objects"]) for sample in samples]
        assert objects == [1 + i % 2 for i in range(REFERENCE_SHARD_SIZE)], entry["name"]
        rows = [row for row in read_sample_rows(reference / entry["samples_file"]) if row["status"] == "accepted"]
        assert [row["objects"] for row in rows] == objects
        counts.update(objects)
    assert counts == {1: REFERENCE_SHARDS * 3, 2: REFERENCE_SHARDS * 2}


# -- verify ------------------------------------------------------------------------------------

def test_verify_passes_on_a_fresh_build_and_prints_the_fingerprint_of_the_bytes(reference):
    result = run_cli(["verify", reference, "--quiet"])
    assert f"{REFERENCE_N} samples in {REFERENCE_SHARDS} shards checked: 0 problem(s)" in result.output
    assert "BAD" not in result.output
    manifest = json.loads((reference / "manifest.json").read_text())
    assert f"fingerprint {manifest['fingerprint']}" in result.output


@pytest.mark.parametrize("form", ["manifest", "pattern", "tar"])
def test_verify_accepts_every_shard_set_form(reference, form):
    spec = {"manifest": reference / "manifest.json", "pattern": reference / "shard-{000001..000002}.tar",
            "tar": reference / shard_name(3)}[form]
    result = run_cli(["verify", spec, "--quiet"])
    shards = {"manifest": REFERENCE_SHARDS, "pattern": 2, "tar": 1}[form]
    assert f"{shards * REFERENCE_SHARD_SIZE} samples in {shards} shards checked: 0 problem(s)" in result.output
    assert ("\nfingerprint " in "\n" + result.stdout) == (form == "manifest")


def test_verify_checks_a_single_tar_against_its_folders_manifest(reference_copy):
    tar = reference_copy / shard_name(2)
    data = bytearray(tar.read_bytes())
    data[-2000] ^= 0x01  # in the end-of-archive padding: the tar still reads, its checksum changes
    tar.write_bytes(bytes(data))
    result = run_cli(["verify", tar, "--quiet"], expect=1)
    assert f"BAD {shard_name(2)}: sha256" in result.output


def test_verify_refuses_a_manifest_that_names_a_file_outside_its_folder(reference_copy, tmp_path):
    outside = tmp_path / "outside.tar"
    outside.write_bytes(b"\0" * 1024)
    path = reference_copy / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["shards"][0]["name"] = "../outside.tar"
    path.write_text(json.dumps(manifest))
    result = run_cli(["verify", reference_copy, "--quiet"], expect=1)
    assert "'../outside.tar'" in result.output and "plain file name" in result.output


def test_verify_catches_a_flipped_byte(reference_copy):
    tar = reference_copy / shard_name(1)
    data = bytearray(tar.read_bytes())
    data[len(data) // 2] ^= 0xFF
    tar.write_bytes(bytes(data))
    result = run_cli(["verify", reference_copy, "--quiet"], expect=1)
    bad = [line for line in result.output.splitlines() if line.startswith("BAD")]
    # every line names the broken shard, but the set's totals: its sample count when the flip breaks
    # a tar header, and its fingerprint recomputed from the bytes on disk
    set_lines = ("BAD manifest says", "BAD the shards on disk have fingerprint")
    assert bad and all(shard_name(1) in line or line.startswith(set_lines) for line in bad), result.output
    assert any(shard_name(1) in line and "sha256" in line for line in bad)
    assert any(line.startswith(set_lines[1]) for line in bad)
    assert "\nfingerprint " not in result.output


def rewrite_sample(out, shard: int, index: int, change) -> None:
    """Apply ``change(members)`` to one sample of shard ``shard`` of the set at ``out`` and record the
    rewritten shard in the manifest (checksum, size and fingerprint updated, as a malicious or
    careless rewrite would): only the sample's content tells."""
    tar = out / shard_name(shard)
    samples = list(iter_tar_samples(tar))
    change(samples[index])
    with ShardWriter(tar) as writer:
        for members in samples:
            writer.write(members)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["shards"][shard].update(sha256=writer.sha256, bytes=writer.bytes)
    manifest["fingerprint"] = fingerprint(manifest["config_hash"], manifest["shards"])
    (out / "manifest.json").write_text(json.dumps(manifest))


def test_verify_catches_altered_correspondences_with_matching_checksums(reference_copy):
    out, shard, index = reference_copy, 1, 2
    key = sample_key(shard, index)

    def shifted(members):
        flow = decode_npy(members["src2tgt.npy"]).astype(np.float32)
        members["src2tgt.npy"] = encode_npy(np.clip(flow + 0.05, 0, 1).astype(np.float16))

    rewrite_sample(out, shard, index, shifted)

    result = run_cli(["verify", out, "--quiet"], expect=1)
    bad = [line for line in result.output.splitlines() if line.startswith("BAD")]
    assert len(bad) == 2, result.output
    assert all(shard_name(shard) in line and f"sample {key}" in line for line in bad)
    assert "differ from the checksum recorded" in bad[0] and "src_to_tgt" in bad[1]


def member_data_offset(tar, member_name: str) -> int:
    """Byte offset of a tar member's data in the file."""
    with tarfile.open(tar) as archive:
        return archive.getmember(member_name).offset_data


@pytest.mark.parametrize("field", ["src.jpg", "tgt.mask.png", "json"])
def test_verify_names_the_sample_whose_data_bytes_flipped(reference_copy, field):
    """A flipped byte inside one sample's data is traced to that sample by the checksum its build
    recorded, whether or not the damaged member still decodes."""
    shard, index = 2, 3
    key = sample_key(shard, index)
    tar = reference_copy / shard_name(shard)
    data = bytearray(tar.read_bytes())
    data[member_data_offset(tar, f"{key}.{field}") + 5] ^= 0x01
    tar.write_bytes(bytes(data))
    result = run_cli(["verify", reference_copy, "--quiet"], expect=1)
    bad = [line for line in result.output.splitlines() if line.startswith("BAD")]
    named = [line for line in bad if f"sample {key}" in line]
    assert any("differ from the checksum recorded" in line for line in named), result.output
    assert not [line for line in bad if "sample" in line and f"sample {key}" not in line], result.output


def test_verify_says_when_only_tar_padding_changed(reference_copy):
    tar = reference_copy / shard_name(2)
    with tarfile.open(tar) as archive:
        member = next(m for m in archive.getmembers() if m.size % tarfile.BLOCKSIZE)
    data = bytearray(tar.read_bytes())
    data[member.offset_data + member.size] ^= 0x01  # in the zeros that pad the member to a block
    tar.write_bytes(bytes(data))
    result = run_cli(["verify", reference_copy, "--quiet"], expect=1)
    assert "every sample matches its recorded checksum" in result.output
    assert "differ from the checksum recorded" not in result.output


def test_verify_reports_a_missing_shard(reference_copy):
    (reference_copy / shard_name(3)).unlink()
    result = run_cli(["verify", reference_copy, "--quiet"], expect=1)
    assert f"BAD {shard_name(3)}: missing" in result.output
    assert f"{REFERENCE_N - REFERENCE_SHARD_SIZE} samples" in result.output


def test_verify_names_packages_whose_versions_differ_from_the_sets(reference_copy):
    path = reference_copy / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["versions"]["opencv"] = "5.0.0.93"  # versions are not part of the fingerprint
    path.write_text(json.dumps(manifest))
    result = run_cli(["verify", reference_copy, "--quiet"])
    assert "0 problem(s)" in result.output
    assert "opencv 5.0.0.93 in the set" in result.stderr and "may give other bytes" in result.stderr


def test_rebuild_check_reproduces_shards_byte_for_byte(reference):
    result = run_cli(["verify", reference, "--quiet", "--rebuild-check", "2"])
    assert "rebuild check: 2 of 2 shards rebuilt byte for byte" in result.output, all_output(result)
    assert f"rebuilding {shard_name(0)}" in result.stderr and f"rebuilding {shard_name(REFERENCE_SHARDS - 1)}" \
        in result.stderr


def test_rebuild_check_locates_where_a_stored_shard_differs(reference_copy):
    """A shard rewritten with one sample's mask changed (manifest and fingerprint updated, so that
    only a rebuild can tell): the check names the shard, the sample and the member."""
    shard, index = REFERENCE_SHARDS - 1, 2

    def spaced(members):
        members["json"] = members["json"].replace(b'"schema_version"', b'"schema_version" ', 1)

    rewrite_sample(reference_copy, shard, index, spaced)
    result = run_cli(["verify", reference_copy, "--quiet", "--rebuild-check", "2"], expect=1)
    bad = [line for line in result.output.splitlines() if line.startswith("BAD") and "rebuilt" in line]
    assert len(bad) == 1, result.output
    assert shard_name(shard) in bad[0] and f"sample {sample_key(shard, index)} (json)" in bad[0]
    assert "rebuild check: 1 of 2 shards" in result.output


def test_rebuild_check_needs_the_bank_and_says_so(reference_copy):
    shutil.rmtree(reference_copy / "bank")
    result = run_cli(["verify", reference_copy, "--quiet", "--rebuild-check", "1"], expect=1)
    assert "no segment bank beside the shards" in all_output(result)


def test_verify_catches_a_manifest_whose_fingerprint_does_not_match(reference_copy):
    path = reference_copy / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["fingerprint"] = "0" * 64
    path.write_text(json.dumps(manifest))
    result = run_cli(["verify", reference_copy, "--quiet"], expect=1)
    assert "fingerprint does not match" in result.output


# -- the reader's contract -------------------------------------------------------------------------

def test_trainer_reads_every_sample_with_the_right_shapes(reference):
    samples = list(iter_samples(reference))
    assert [s.key for s in samples] == [sample_key(k, i) for k in range(REFERENCE_SHARDS)
                                        for i in range(REFERENCE_SHARD_SIZE)]
    for sample in samples:
        for image in (sample.src_image, sample.tgt_image):
            assert image.shape == (480, 480, 3) and image.dtype == np.uint8
        for grid in (sample.src_grid_mask, sample.tgt_grid_mask):
            assert grid.shape == (30, 30) and 0 <= grid.min() and grid.max() <= 1 and grid.sum() > 0
        for flow in (sample.src_to_tgt, sample.tgt_to_src):
            assert flow.shape == (30, 30, 2) and np.isfinite(flow).all()
        ids = list(range(1, len(sample.meta["objects"]) + 1))
        assert [obj["id"] for obj in sample.meta["objects"]] == ids
        assert len(ids) in (1, 2)
        for mask in (sample.src_mask, sample.tgt_mask):
            assert mask.shape == (480, 480) and mask.dtype == np.uint8
            assert sorted(set(np.unique(mask).tolist()) - {0}) == ids, sample.key
        assert sample.meta["key"] == sample.key and sample.meta["seed"]["root"] == 0


# -- file-system errors: one line naming the path and the cause, nothing half-written ----------------

@pytest.mark.parametrize("where", ["out", "manifests"])
def test_a_place_that_cannot_be_written_fails_before_any_work(tmp_path, where):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    out = blocker / "out" if where == "out" else tmp_path / "out"
    manifests = blocker / "manifests" if where == "manifests" else tmp_path / "manifests"
    result = run_cli(build_args(out, manifests=manifests), expect=1)
    message = all_output(result)
    option = "--out" if where == "out" else "--manifests-dir"
    assert f"{option} {blocker}" in message and "Not a directory" in message and "Traceback" not in message
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("shard-*"))


def test_a_full_disk_mid_build_is_one_line_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    import errno

    import datagen.format.shards

    out = tmp_path / "out"
    original = datagen.format.shards._HashingFile.write
    calls = {"n": 0}

    def filling_up(self, data):
        calls["n"] += 1
        if calls["n"] > 12:  # two whole shards go through, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device", str(self.handle.name))
        return original(self, data)

    monkeypatch.setattr(datagen.format.shards._HashingFile, "write", filling_up)
    result = run_cli(build_args(out), expect=1)
    message = all_output(result)
    assert "No space left on device" in message and ".tar.tmp" in message and "Traceback" not in message
    assert len([line for line in result.stderr.splitlines() if line.startswith("Error")]) == 1, result.stderr
    assert_no_tmp(out)
    assert not (out / "manifest.json").exists()
