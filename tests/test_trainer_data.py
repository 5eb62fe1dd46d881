"""The trainer's shard stream: shard lists, examples, shuffling, corrupt shards."""
import json
import random
import shutil

import numpy as np
import pytest
import torch

from datagen.format.grids import recompute_grids
from datagen.format.shards import shard_name
from trainer.config import TrainConfig
from trainer.data import PairStream, dataset_fingerprint, iter_samples, make_loader, shard_urls, to_example


def test_shard_urls_from_directory_manifest_pattern_and_list(reference):
    names = [str(reference / shard_name(k)) for k in range(4)]
    assert shard_urls(reference) == names
    assert shard_urls(reference / "manifest.json") == names
    assert shard_urls(str(reference / "shard-{000001..000002}.tar")) == names[1:3]
    assert shard_urls([names[3], names[0]]) == [names[3], names[0]]


def test_a_manifest_of_another_schema_version_is_refused(reference, tmp_path):
    manifest = json.loads((reference / "manifest.json").read_text())
    manifest["schema_version"] = 99
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="schema"):
        shard_urls(tmp_path / "manifest.json")


def test_missing_shards_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        shard_urls(tmp_path)


def test_example_roles_swap_with_all_their_fields(reference):
    sample = next(iter_samples(reference))
    config = TrainConfig(swap_prob=1.0, style_prob=0.0, hide_prob=0.0)
    example = to_example(sample, config, random.Random(0))
    assert np.array_equal(example.src_image, sample.tgt_image)
    assert np.array_equal(example.src_mask[0], sample.tgt_grid_mask)
    assert np.array_equal(example.src_to_tgt, sample.tgt_to_src.transpose(2, 0, 1))
    assert np.array_equal(example.tgt_to_src, sample.src_to_tgt.transpose(2, 0, 1))
    assert not example.tgt_hide.any()


def test_hidden_tokens_are_the_target_cells_outside_its_mask(reference):
    sample = next(iter_samples(reference))
    example = to_example(sample, TrainConfig(swap_prob=0.0, hide_prob=1.0), random.Random(0))
    assert np.array_equal(example.tgt_hide, sample.tgt_grid_mask < 0.5)


def test_another_network_grid_is_recomputed_from_the_stored_warps(reference):
    sample = next(iter_samples(reference))
    config = TrainConfig(image_size=96, swap_prob=0.0)
    example = to_example(sample, config, random.Random(0))
    assert example.src_image.shape == (96, 96, 3)
    expected = recompute_grids(sample, (6, 6))
    assert np.array_equal(example.src_to_tgt, expected["src_to_tgt"].transpose(2, 0, 1))
    assert np.array_equal(example.tgt_mask[0], expected["tgt_grid_mask"])


def small_stream(shards, **overrides):
    config = TrainConfig(**{"positives": 2, "image_size": 96, "shuffle_buffer": 4, **overrides})
    return PairStream(shard_urls(shards), config)


def test_the_train_time_tps_changes_only_the_targets_and_is_reproducible(reference):
    """The TPS draws from a generator of its own (seeded per worker and rank like the stream's):
    with it on, the stream gives the same pairs in the same order with the same sources, and the
    same seed gives the same warped targets."""
    def first_batches(**overrides):
        batches = iter(small_stream(reference, **overrides))
        return [next(batches) for _ in range(6)]

    off, on, again = first_batches(tps_prob=0.0), first_batches(tps_prob=1.0), first_batches(tps_prob=1.0)
    assert [b["keys"] for b in off] == [b["keys"] for b in on]
    assert all(torch.equal(a["src_image"], b["src_image"]) for a, b in zip(off, on))
    assert all(not torch.equal(a["tgt_image"][k], b["tgt_image"][k]) for a, b in zip(off, on) for k in range(2))
    for name in ("tgt_image", "tgt_mask", "src_mask", "src_to_tgt", "tgt_to_src", "tgt_hide"):
        assert all(torch.equal(a[name], b[name]) for a, b in zip(on, again)), name


def test_each_epoch_visits_the_shards_in_a_new_order(reference):
    stream = small_stream(reference)
    batches = iter(stream)
    keys = [key for _ in range(40) for key in next(batches)["keys"]]  # 80 samples: 4 epochs of 20
    epochs = [keys[i:i + 20] for i in range(0, 80, 20)]
    shard_order = [[k.split("_")[0] for k in epoch] for epoch in epochs]
    firsts = {tuple(dict.fromkeys(order)) for order in shard_order}
    assert len(firsts) > 1  # not the same shard order every epoch
    assert sorted(set(keys)) == sorted({k for epoch in epochs for k in epoch})
    assert len(set(keys)) == 20  # every sample is seen


def test_a_corrupt_shard_is_skipped_counted_and_training_goes_on(reference, tmp_path, capsys):
    for k in range(4):
        shutil.copy(reference / shard_name(k), tmp_path / shard_name(k))
    data = (tmp_path / shard_name(1)).read_bytes()
    (tmp_path / shard_name(1)).write_bytes(data[:len(data) // 3])  # truncated mid-sample
    (tmp_path / shard_name(2)).write_bytes(b"this is not a tar file" * 100)
    stream = small_stream([str(tmp_path / shard_name(k)) for k in range(4)])
    batches = iter(stream)
    seen = [next(batches) for _ in range(12)]
    assert sum(batch["skipped"] for batch in seen) >= 2
    keys = {key for batch in seen for key in batch["keys"]}
    assert any(key.startswith("000000_") for key in keys) and any(key.startswith("000003_") for key in keys)
    assert shard_name(2) in capsys.readouterr().err


def test_loader_workers_share_the_shards(reference):
    config = TrainConfig(positives=2, image_size=96, shuffle_buffer=2)
    loader = make_loader(reference, config, workers=2)
    keys = set()
    for batch, _ in zip(loader, range(20)):
        keys.update(batch["keys"])
    assert {key.split("_")[0] for key in keys} == {"000000", "000001", "000002", "000003"}


# -- damaged and hostile shards: skipped, counted and named; never decoded blindly ----------------

def copy_set(reference, tmp_path):
    out = tmp_path / "set"
    shutil.copytree(reference, out)
    return out


def rewrite_sample(tar, index: int, **members):
    """Rewrite shard ``tar`` with sample ``index``'s members replaced by ``members`` (bytes)."""
    from datagen.format.shards import ShardWriter, iter_tar_samples

    samples = list(iter_tar_samples(tar))
    samples[index].update({name.replace("_", "."): value for name, value in members.items()})
    with ShardWriter(tar) as writer:
        for sample in samples:
            writer.write(sample)


def stream_keys(shards, capsys, batches: int = 12, **config) -> tuple[set, int, str]:
    stream = iter(small_stream(shards, **config))
    seen = [next(stream) for _ in range(batches)]
    return ({key for batch in seen for key in batch["keys"]}, sum(batch["skipped"] for batch in seen),
            capsys.readouterr().err)


@pytest.mark.parametrize("damage, words", [
    ("json_is_a_list", "not an object"),
    ("huge_mask", "declares"),
    ("huge_grid", "declares"),
    ("bad_warp", "sample 000001_000003"),
])
def test_a_malformed_sample_is_skipped_and_named_and_the_rest_is_used(reference, tmp_path, capsys, damage,
                                                                       words):
    import struct
    import zlib

    import cv2

    from datagen.format.schema import encode_npy
    from datagen.format.shards import iter_tar_samples

    shards = copy_set(reference, tmp_path)
    tar = shards / shard_name(1)
    original = list(iter_tar_samples(tar))[3]
    if damage == "json_is_a_list":
        rewrite_sample(tar, 3, json=b"[1, 2, 3]")
    elif damage == "huge_mask":  # a small PNG whose header declares 60000 x 60000 pixels
        ok, png = cv2.imencode(".png", np.zeros((8, 8), np.uint8))
        data = bytearray(png.tobytes())
        data[16:24] = struct.pack(">II", 60000, 60000)
        data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
        rewrite_sample(tar, 3, src_mask_png=bytes(data))
    elif damage == "huge_grid":
        rewrite_sample(tar, 3, src_gridmask_npy=encode_npy(np.zeros((1, 5000, 5000), np.float16)[:, :1, :1])
                       .replace(b"(1, 1, 1)", b"(1, 5000, 5000)"))
    else:  # a warp that cannot be inverted: only recomputing the grids (another image size) meets it
        meta = json.loads(original["json"])
        meta["objects"][0]["warp"]["affine"] = [[0, 0, 0], [0, 0, 0], [0, 0, 1]]
        rewrite_sample(tar, 3, json=json.dumps(meta).encode())
    keys, skipped, err = stream_keys(shards, capsys, **({"image_size": 64} if damage == "bad_warp" else {}))
    assert skipped >= 1 and words in err and "000001_000003" in err, err
    assert "000001_000003" not in keys
    assert {key.split("_")[0] for key in keys} >= {"000000", "000002"}


def test_a_compressed_tar_is_refused_without_expanding_it(reference, tmp_path, capsys):
    import gzip

    shards = copy_set(reference, tmp_path)
    (shards / shard_name(2)).write_bytes(gzip.compress(bytes(64 << 20), compresslevel=9))  # 64 MB of zeros
    assert (shards / shard_name(2)).stat().st_size < 1 << 20
    keys, skipped, err = stream_keys([str(shards / shard_name(k)) for k in range(4)], capsys)
    assert skipped >= 1 and shard_name(2) in err and "gzip-compressed file, not a plain tar" in err, err
    assert not any(key.startswith("000002_") for key in keys)


def test_a_cut_between_members_is_reported_by_name(reference, tmp_path, capsys):
    from datagen.format.shards import iter_tar_samples

    shards = copy_set(reference, tmp_path)
    tar = shards / shard_name(1)
    data = tar.read_bytes()
    first = sum(512 + -(-len(v) // 512) * 512 for k, v in next(iter_tar_samples(tar)).items() if k != "__key__")
    tar.write_bytes(data[:first + 700])  # one whole sample, then a cut inside the next one's first member
    keys, skipped, err = stream_keys([str(shards / shard_name(k)) for k in range(4)], capsys)
    assert skipped >= 1 and shard_name(1) in err and "000001_000000" in err, err
    assert "000001_000000" in keys and not any(k.startswith("000001_") and k != "000001_000000" for k in keys)


def test_verify_shards_skips_a_shard_whose_bytes_changed(reference, tmp_path, capsys):
    shards = copy_set(reference, tmp_path)
    tar = shards / shard_name(1)
    data = bytearray(tar.read_bytes())
    data[len(data) // 2] ^= 0x01  # same size, one bit: a lenient reader trains on it
    tar.write_bytes(bytes(data))
    config = TrainConfig(positives=2, image_size=96, shuffle_buffer=4)
    loader = iter(make_loader(shards, config, workers=0, verify=True))
    seen = [next(loader) for _ in range(12)]
    keys = {key for batch in seen for key in batch["keys"]}
    assert not any(key.startswith("000001_") for key in keys)
    err = capsys.readouterr().err
    assert shard_name(1) in err and "sha256" in err, err
    loose = tmp_path / "loose"
    loose.mkdir()
    shutil.copy(reference / shard_name(0), loose / shard_name(0))  # no manifest beside it
    with pytest.raises(ValueError, match="manifest"):
        make_loader([str(tar), str(loose / shard_name(0))], config, workers=0, verify=True)


def test_shards_are_checked_by_default_and_not_when_asked(reference, tmp_path, capsys):
    """By default the trainer checks the bytes of every shard a manifest lists (the fingerprint
    it records stands for them), warns about those none lists, and checks none on request."""
    shards = copy_set(reference, tmp_path)
    tar = shards / shard_name(1)
    data = bytearray(tar.read_bytes())
    data[len(data) // 2] ^= 0x01
    tar.write_bytes(bytes(data))
    config = TrainConfig(positives=2, image_size=96, shuffle_buffer=4)

    def keys_of(loader):
        batches = iter(loader)
        return {key for _ in range(12) for key in next(batches)["keys"]}

    assert not any(key.startswith("000001_") for key in keys_of(make_loader(shards, config, workers=0)))
    assert "sha256" in capsys.readouterr().err
    unchecked = keys_of(make_loader(shards, config, workers=0, verify=False))
    assert any(key.startswith("000001_") for key in unchecked)  # flipped bytes in the JPEG or PNG data decode

    loose = tmp_path / "loose"
    loose.mkdir()
    shutil.copy(reference / shard_name(0), loose / shard_name(0))
    make_loader([str(tar), str(loose / shard_name(0))], config, workers=0)
    err = capsys.readouterr().err
    assert "1 shard(s) are not listed" in err and shard_name(0) in err, err


def test_a_manifest_whose_fingerprint_is_not_its_shard_lists_is_refused(reference, tmp_path):
    shards = copy_set(reference, tmp_path)
    manifest = json.loads((shards / "manifest.json").read_text())
    manifest["shards"][1]["sha256"] = "0" * 64  # the listed checksum changed, the fingerprint kept
    (shards / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="not that of its shard list"):
        dataset_fingerprint(shards)


def test_a_worker_whose_shards_vanish_fails_instead_of_spinning(reference, tmp_path):
    """Leftover samples in the shuffle buffer must not keep a worker looping over unreadable
    epochs without a batch: in a multi-process run the other ranks would wait for it forever."""
    import signal

    tar = tmp_path / shard_name(0)
    shutil.copy(reference / shard_name(0), tar)
    stream = iter(small_stream([str(tar)], shuffle_buffer=4))
    next(stream)
    tar.unlink()

    def hung(signum, frame):
        raise AssertionError("the stream kept looping without a batch or an error")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(20)
    try:
        with pytest.raises(RuntimeError, match="no readable sample"):
            for _ in range(10):
                next(stream)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
