"""Tests of datagen.format.manifest: sample rows, stats markers, fingerprint and manifest files."""
from __future__ import annotations

import copy
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from datagen.config import BuildConfig
from datagen.format.hashing import config_hash
from datagen.format.manifest import (
    SAMPLE_ROWS_SCHEMA,
    ManifestError,
    build_manifest,
    fingerprint,
    load_manifest,
    make_stats,
    package_versions,
    read_sample_rows,
    read_stats,
    samples_name,
    stats_name,
    write_manifest,
    write_sample_rows,
    write_stats,
)
from datagen.format.schema import SCHEMA_VERSION
from datagen.format.shards import sample_key, shard_name


def make_rows(shard: int = 3) -> list[dict]:
    return [
        {"shard": shard, "attempt": 0, "key": None, "status": "rejected", "reason": "mask_too_small",
         "objects": 1, "source_image_id": 11, "background_image_id": 12, "segment_ids": [5],
         "category_ids": [18], "seed": f"root=0 shard={shard} attempt=0", "bytes": 0, "sha256": None},
        {"shard": shard, "attempt": 1, "key": sample_key(shard, 0), "status": "accepted", "reason": None,
         "objects": 2, "source_image_id": 13, "background_image_id": 14, "segment_ids": [6, 7],
         "category_ids": [1, 3], "seed": f"root=0 shard={shard} attempt=1", "bytes": 12345, "sha256": "ab" * 32},
    ]


def stats_for(index: int, samples: int = 10, sha: str | None = None, config: BuildConfig | None = None):
    return make_stats(shard_index=index, samples=samples, attempted=samples + 2,
                      rejected={"mask_too_small": 1, "tps_inverse": 1}, bytes=1000 * samples,
                      sha256=sha or f"{index:064x}", config_hash=config_hash(config or BuildConfig()))


def test_names():
    assert samples_name(12) == "shard-000012.samples.parquet"
    assert stats_name(12) == "shard-000012.stats.json"


def test_sample_rows_deterministic_and_readable(tmp_path):
    rows = make_rows()
    a = write_sample_rows(rows, tmp_path / "a" / samples_name(3))
    b = write_sample_rows(rows, tmp_path / "b" / samples_name(3))
    assert a.read_bytes() == b.read_bytes()
    assert not list(tmp_path.rglob("*.tmp"))
    table = pq.read_table(a)
    assert table.schema.equals(SAMPLE_ROWS_SCHEMA)
    assert table.to_pylist() == rows
    assert read_sample_rows(a) == rows

    changed = [dict(rows[0]), dict(rows[1], bytes=1)]
    c = write_sample_rows(changed, tmp_path / "c" / samples_name(3))
    assert c.read_bytes() != a.read_bytes()


def test_sample_rows_written_before_checksums_read_back_with_none(tmp_path):
    """A rows file of a set built before per-sample checksums were recorded still reads."""
    rows = make_rows()
    old_schema = pa.schema([field for field in SAMPLE_ROWS_SCHEMA if field.name != "sha256"])
    old = pa.Table.from_pylist([{k: v for k, v in row.items() if k != "sha256"} for row in rows], schema=old_schema)
    pq.write_table(old, tmp_path / samples_name(3))
    assert read_sample_rows(tmp_path / samples_name(3)) == [dict(row, sha256=None) for row in rows]


def test_sample_rows_missing_optional_columns_are_null(tmp_path):
    path = write_sample_rows([{"shard": 0, "attempt": 0, "status": "rejected", "reason": "too_small"}],
                             tmp_path / samples_name(0))
    row = pq.read_table(path).to_pylist()[0]
    assert row["key"] is None and row["segment_ids"] is None and row["bytes"] == 0


@pytest.mark.parametrize("change", [
    {"status": "maybe"},
    {"status": "accepted", "key": None, "reason": None},
    {"status": "rejected", "key": "000003_000000", "reason": "x"},
    {"unknown_column": 1},
    {"objects": "two"},
])
def test_sample_rows_validation(tmp_path, change):
    rows = [dict(make_rows()[0], **change)]
    with pytest.raises(ValueError):
        write_sample_rows(rows, tmp_path / samples_name(3))
    assert not list(tmp_path.iterdir())


def test_stats_round_trip_and_marker(tmp_path):
    stats = stats_for(2)
    assert stats["name"] == shard_name(2) and stats["schema_version"] == SCHEMA_VERSION
    path = write_stats(tmp_path / stats_name(2), stats)
    assert read_stats(path) == stats
    assert not list(tmp_path.glob("*.tmp"))
    with pytest.raises(ValueError, match="sha256"):
        write_stats(tmp_path / stats_name(3), {k: v for k, v in stats.items() if k != "sha256"})


def test_read_stats_missing_or_garbled(tmp_path):
    assert read_stats(tmp_path / "nope.stats.json") is None
    garbled = tmp_path / stats_name(0)
    garbled.write_text('{"shard": 0, "name": ')
    assert read_stats(garbled) is None
    garbled.write_bytes(b"\xff\xfe\x00")
    assert read_stats(garbled) is None
    garbled.write_text("[1, 2]")
    assert read_stats(garbled) is None
    garbled.write_text('{"shard": 0}')
    assert read_stats(garbled) is None


def test_fingerprint():
    shards = [stats_for(i) for i in range(3)]
    base = fingerprint("abc", shards)
    assert fingerprint("abc", list(reversed(shards))) == base
    for i in range(3):
        changed = [dict(s) for s in shards]
        changed[i]["sha256"] = "f" * 64
        assert fingerprint("abc", changed) != base
    assert fingerprint("abd", shards) != base
    assert fingerprint("abc", shards[:2]) != base
    fewer = [dict(s) for s in shards]
    fewer[0]["samples"] = 9
    assert fingerprint("abc", fewer) != base


def test_package_versions():
    versions = package_versions()
    for name in ("python", "numpy", "opencv", "pycocotools", "pyarrow", "scipy", "datagen"):
        assert name in versions
    assert versions["numpy"] and versions["python"]


def make_manifest(order=(0, 1, 2)):
    config = BuildConfig()
    return build_manifest(config=config, root_seed=7, inputs={"coco_root": "/data/coco"},
                          shard_stats=[stats_for(i) for i in order], n_requested=30)


def test_build_manifest():
    manifest = make_manifest()
    assert manifest["schema_version"] == SCHEMA_VERSION
    assert manifest["config_hash"] == config_hash(BuildConfig())
    # deepcopy: BuildConfig.from_dict changes the nested "warp" dict it is given
    assert BuildConfig.from_dict(copy.deepcopy(manifest["config"])) == BuildConfig()
    assert manifest["n_samples"] == 30 and manifest["n_attempted"] == 36 and manifest["n_requested"] == 30
    assert manifest["rejected"] == {"mask_too_small": 3, "tps_inverse": 3}
    assert [s["name"] for s in manifest["shards"]] == [shard_name(i) for i in range(3)]
    assert set(manifest["shards"][0]) == {"name", "samples", "bytes", "sha256", "samples_file", "stats_file"}
    assert manifest["shards"][1]["samples_file"] == samples_name(1)
    assert manifest["fingerprint"] == fingerprint(manifest["config_hash"], manifest["shards"])
    assert make_manifest(order=(2, 0, 1)) == manifest
    text = json.dumps(manifest)
    assert "time" not in json.dumps(sorted(manifest)) and "argv" not in text


def test_build_manifest_refuses_mixed_shards():
    other = BuildConfig(jpeg_quality=80)
    with pytest.raises(ValueError, match=shard_name(1)):
        build_manifest(config=BuildConfig(), root_seed=0, inputs={},
                       shard_stats=[stats_for(0), stats_for(1, config=other)], n_requested=20)
    with pytest.raises(ValueError, match="twice"):
        build_manifest(config=BuildConfig(), root_seed=0, inputs={},
                       shard_stats=[stats_for(0), stats_for(0)], n_requested=20)


def test_write_and_load_manifest(tmp_path):
    manifest = make_manifest()
    out_dir = tmp_path / "coco-train"
    path = write_manifest(manifest, out_dir, copies_dir=tmp_path / "copies")
    assert path == out_dir / "manifest.json"
    text = path.read_text()
    assert text == json.dumps(manifest, sort_keys=True, indent=2) + "\n"
    copy = tmp_path / "copies" / f"coco-train-{manifest['fingerprint'][:12]}.json"
    assert copy.read_text() == text
    assert load_manifest(out_dir) == manifest
    assert load_manifest(path) == manifest
    again = write_manifest(make_manifest(), tmp_path / "again")
    assert again.read_bytes() == path.read_bytes()
    assert not list(tmp_path.rglob("*.tmp"))


def test_load_manifest_errors(tmp_path):
    with pytest.raises(ManifestError, match="manifest.json"):
        load_manifest(tmp_path)
    path = tmp_path / "manifest.json"
    path.write_text("{not json")
    with pytest.raises(ManifestError, match=str(path)):
        load_manifest(path)
    manifest = make_manifest()
    manifest["schema_version"] = SCHEMA_VERSION + 1
    write_manifest(manifest, tmp_path)
    with pytest.raises(ManifestError, match=str(path)) as info:
        load_manifest(tmp_path)
    assert "schema version" in str(info.value)


def test_version_differences_name_the_package_and_what_it_decides():
    from datagen.format.manifest import BYTES_DEPEND_ON, package_versions, version_differences

    here = package_versions()
    assert version_differences(here, here) == []
    assert set(here) <= set(BYTES_DEPEND_ON)  # every recorded package says what it decides
    lines = version_differences(dict(here, opencv="5.0.0.93", scipy="1.0"), here)
    assert len(lines) == 2
    assert lines[0].startswith(f"opencv 5.0.0.93 in the set, {here['opencv']} here") and "JPEG" in lines[0]
    assert lines[1].startswith("scipy 1.0 in the set") and "blend" in lines[1]
