"""Tests of datagen.format.shards: reproducible atomic tar writing and strict reading."""
from __future__ import annotations

import hashlib
import io
import tarfile

import numpy as np
import pytest
from synthetic import shifted_square_pair

from datagen.format.hashing import sha256_file
from datagen.format.schema import PairSample, decode_sample, encode_sample
from datagen.format.shards import (
    ShardError,
    ShardWriter,
    iter_tar_samples,
    parse_shard_index,
    sample_key,
    sample_sha256,
    shard_name,
)


def make_sample(key: str, shift: int = 8, size: int = 64, grid: int = 4, seed: int = 0) -> PairSample:
    return shifted_square_pair(key, shift, size, grid, square=(16, 40), seed=seed, category="cat")


def write_shard(path, samples, quality=90):
    with ShardWriter(path) as writer:
        for sample in samples:
            writer.write(encode_sample(sample, quality))
    return writer


def test_names_and_keys():
    assert shard_name(12) == "shard-000012.tar"
    assert sample_key(12, 345) == "000012_000345"
    assert "." not in sample_key(0, 0)
    assert parse_shard_index("shard-000012.tar") == 12
    assert parse_shard_index("/x/y/shard-000003.stats.json") == 3
    with pytest.raises(ValueError):
        parse_shard_index("foo.tar")
    with pytest.raises(ValueError):
        shard_name(-1)
    with pytest.raises(ValueError):
        shard_name(1_000_000)


def test_identical_input_gives_identical_bytes(tmp_path):
    samples = [make_sample(sample_key(0, i), seed=i) for i in range(3)]
    first = write_shard(tmp_path / "a" / shard_name(0), samples)
    second = write_shard(tmp_path / "b" / shard_name(0), samples)
    a = (tmp_path / "a" / shard_name(0)).read_bytes()
    b = (tmp_path / "b" / shard_name(0)).read_bytes()
    assert a == b
    assert first.sha256 == second.sha256 == hashlib.sha256(a).hexdigest()
    assert first.sha256 == sha256_file(tmp_path / "a" / shard_name(0))
    assert first.bytes == len(a)
    assert first.count == 3
    assert not list(tmp_path.rglob("*.tmp"))

    changed = samples[:2] + [make_sample(sample_key(0, 2), shift=4, seed=2)]
    third = write_shard(tmp_path / "c" / shard_name(0), changed)
    assert third.sha256 != first.sha256


def test_sample_checksum_is_what_reads_back_and_changes_with_any_byte(tmp_path):
    """write() returns each sample's checksum; the reader's members hash to the same value, and a
    changed byte, a renamed field, a moved byte between fields or another key changes it."""
    samples = [encode_sample(make_sample(sample_key(0, i), seed=i), 90) for i in range(2)]
    with ShardWriter(tmp_path / shard_name(0)) as writer:
        written = [writer.write(members) for members in samples]
    read = list(iter_tar_samples(tmp_path / shard_name(0)))
    assert [w.sha256 for w in written] == [sample_sha256(m) for m in read] == [sample_sha256(m) for m in samples]
    assert [w.bytes for w in written] == [sum(len(v) for k, v in m.items() if k != "__key__") for m in samples]
    members = read[0]
    flipped = bytearray(members["src.jpg"])
    flipped[len(flipped) // 2] ^= 1
    variants = [
        dict(members, **{"src.jpg": bytes(flipped)}),
        {("src.jpeg" if k == "src.jpg" else k): v for k, v in members.items()},
        dict(members, __key__=sample_key(0, 9)),
        {"__key__": "k", "a": b"xy", "b": b"z"},
    ]
    digests = {sample_sha256(m) for m in variants} | {sample_sha256(members)}
    assert len(digests) == 5
    assert (sample_sha256({"__key__": "k", "a": b"xy", "b": b"z"})
            != sample_sha256({"__key__": "k", "a": b"x", "b": b"yz"}))


def test_tar_members_are_reproducible(tmp_path):
    write_shard(tmp_path / shard_name(1), [make_sample(sample_key(1, 0))])
    with tarfile.open(tmp_path / shard_name(1)) as tar:
        members = tar.getmembers()
    assert members[0].name == "000001_000000.json"
    for member in members:
        assert member.mtime == 0 and member.mode == 0o444
        assert member.uname == "datagen" and member.gname == "datagen"


def test_bytes_are_those_tarfile_writes(tmp_path):
    """The writer assembles headers and padding itself: the file must be exactly the archive that
    the stdlib's TarFile (what webdataset's TarWriter uses) writes for the same members, its
    end-of-archive blocks and record padding included."""
    samples = [encode_sample(make_sample(sample_key(0, i), seed=i), 90) for i in range(3)]
    with ShardWriter(tmp_path / shard_name(0)) as writer:
        for members in samples:
            writer.write(members)
    reference = tmp_path / "reference.tar"
    with tarfile.open(reference, "w", format=tarfile.USTAR_FORMAT) as tar:
        for members in samples:
            for field in sorted(name for name in members if name != "__key__"):
                info = tarfile.TarInfo(f"{members['__key__']}.{field}")
                info.size, info.mtime, info.mode = len(members[field]), 0, 0o444
                info.uname = info.gname = "datagen"
                tar.addfile(info, io.BytesIO(members[field]))
    written = (tmp_path / shard_name(0)).read_bytes()
    assert written == reference.read_bytes()
    assert len(written) % tarfile.RECORDSIZE == 0


def test_exception_leaves_nothing(tmp_path):
    path = tmp_path / shard_name(0)
    with pytest.raises(RuntimeError, match="boom"):
        with ShardWriter(path) as writer:
            writer.write(encode_sample(make_sample(sample_key(0, 0)), 90))
            raise RuntimeError("boom")
    assert not path.exists()
    assert not (tmp_path / (shard_name(0) + ".tmp")).exists()
    assert list(tmp_path.iterdir()) == []


def test_exception_keeps_older_shard(tmp_path):
    path = tmp_path / shard_name(0)
    write_shard(path, [make_sample(sample_key(0, 0))])
    before = path.read_bytes()
    with pytest.raises(RuntimeError):
        with ShardWriter(path) as writer:
            writer.write(encode_sample(make_sample(sample_key(0, 0), shift=2), 90))
            raise RuntimeError("boom")
    assert path.read_bytes() == before


def test_write_rejects_bad_members(tmp_path):
    with pytest.raises(ValueError):
        with ShardWriter(tmp_path / shard_name(0)) as writer:
            writer.write({"__key__": "a.b", "json": b"{}"})
    with pytest.raises(ValueError, match="written twice"):
        with ShardWriter(tmp_path / shard_name(0)) as writer:
            writer.write({"__key__": "k", "json": b"{}"})
            writer.write({"__key__": "k", "json": b"{}"})
    with pytest.raises(ValueError, match="expected bytes"):
        with ShardWriter(tmp_path / shard_name(0)) as writer:
            writer.write({"__key__": "k", "json": "text"})
    assert list(tmp_path.iterdir()) == []


def test_round_trip(tmp_path):
    samples = [make_sample(sample_key(2, i), seed=i) for i in range(3)]
    samples[1].src_style_image = samples[1].src_image[::-1].copy()
    path = tmp_path / shard_name(2)
    write_shard(path, samples)
    read = [decode_sample(members) for members in iter_tar_samples(path)]
    assert [s.key for s in read] == [s.key for s in samples]
    for got, want in zip(read, samples):
        diff = np.abs(got.src_image.astype(int) - want.src_image.astype(int))
        assert diff.mean() < 6 and got.src_image.shape == want.src_image.shape
        assert np.abs(got.tgt_image.astype(int) - want.tgt_image.astype(int)).mean() < 6
        np.testing.assert_array_equal(got.src_mask, want.src_mask)
        np.testing.assert_array_equal(got.tgt_mask, want.tgt_mask)
        for name in ("src_grid_mask", "tgt_grid_mask", "src_to_tgt", "tgt_to_src"):
            np.testing.assert_array_equal(getattr(got, name),
                                          getattr(want, name).astype(np.float16).astype(np.float32))
        assert got.meta["objects"] == [{"category": "cat"}]
    assert read[1].src_style_image is not None and read[0].src_style_image is None


def test_empty_shard(tmp_path):
    path = tmp_path / shard_name(0)
    writer = write_shard(path, [])
    assert writer.count == 0
    assert list(iter_tar_samples(path)) == []


@pytest.mark.parametrize("cut", [100, 0.5, -1024, -2048 + 1])
def test_truncated_tar_raises(tmp_path, cut):
    path = tmp_path / shard_name(4)
    write_shard(path, [make_sample(sample_key(4, i), seed=i) for i in range(3)])
    data = path.read_bytes()
    # Cut the data before the end-of-archive marker (the tar is padded to 10240-byte records).
    with tarfile.open(path) as tar:
        end = tar.getmembers()[-1].offset_data + tar.getmembers()[-1].size
    end = -(-end // 512) * 512
    if isinstance(cut, float):
        length = int(end * cut) // 512 * 512  # on a block boundary: tarfile alone would not notice
    elif cut > 0:
        length = cut
    else:
        length = end + 1024 + cut
    path.write_bytes(data[:length])
    with pytest.raises(ShardError, match=shard_name(4)):
        list(iter_tar_samples(path))


def test_truncated_tar_names_last_good_key(tmp_path):
    path = tmp_path / shard_name(5)
    write_shard(path, [make_sample(sample_key(5, i), seed=i) for i in range(3)])
    with tarfile.open(path) as tar:
        third = [m for m in tar.getmembers() if m.name.startswith(sample_key(5, 2))][0]
    path.write_bytes(path.read_bytes()[: third.offset_data + 10])
    seen = []
    with pytest.raises(ShardError) as info:
        for members in iter_tar_samples(path):
            seen.append(members["__key__"])
    assert seen == [sample_key(5, 0), sample_key(5, 1)]
    assert info.value.last_key == sample_key(5, 1)
    assert sample_key(5, 1) in str(info.value) and str(path) in str(info.value)


def test_garbage_and_missing_files(tmp_path):
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(b"not a tar at all" * 100)
    with pytest.raises(ShardError, match="garbage.tar"):
        list(iter_tar_samples(garbage))
    with pytest.raises(ShardError, match="missing.tar"):
        list(iter_tar_samples(tmp_path / "missing.tar"))


def test_corrupt_header_in_the_middle(tmp_path):
    path = tmp_path / shard_name(6)
    write_shard(path, [make_sample(sample_key(6, i), seed=i) for i in range(2)])
    with tarfile.open(path) as tar:
        second = [m for m in tar.getmembers() if m.name.startswith(sample_key(6, 1))][0]
    data = bytearray(path.read_bytes())
    data[second.offset: second.offset + 100] = b"\xff" * 100
    path.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=sample_key(6, 0)) as info:
        list(iter_tar_samples(path))
    assert shard_name(6) in str(info.value)
