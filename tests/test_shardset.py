"""datagen.format.shardset: the forms of a shard-set argument, and manifests that point outside their set."""
from __future__ import annotations

import json
import os

import pytest
from conftest import REFERENCE_SHARDS

from datagen.format.manifest import ManifestError
from datagen.format.shards import shard_name
from datagen.format.shardset import ShardSetError, resolve_shard_set


def names(found) -> list[str]:
    return [tar.name for tar in found.tars]


def test_every_form_names_its_tars_with_their_manifest_entries(reference):
    manifest = json.loads((reference / "manifest.json").read_text())
    all_names = [shard_name(k) for k in range(REFERENCE_SHARDS)]
    for spec in (reference, reference / "manifest.json", str(reference)):
        found = resolve_shard_set(spec)
        assert names(found) == all_names and found.whole and found.fingerprint == manifest["fingerprint"]
    part = resolve_shard_set(str(reference / "shard-{000001..000002}.tar"))
    assert names(part) == all_names[1:3] and not part.whole and part.fingerprint is None
    assert part.entry(part.tars[0]) == manifest["shards"][1]
    single = resolve_shard_set(reference / shard_name(3))
    assert names(single) == [shard_name(3)]
    assert single.entry(single.tars[0])["sha256"] == manifest["shards"][3]["sha256"]
    listed = resolve_shard_set([reference / shard_name(2), reference / shard_name(0)])
    assert names(listed) == [shard_name(2), shard_name(0)]


def test_a_folder_without_manifest_lists_its_regular_tars(reference, tmp_path):
    for k in (1, 0):
        (tmp_path / shard_name(k)).write_bytes((reference / shard_name(k)).read_bytes())
    os.mkfifo(tmp_path / shard_name(2))
    found = resolve_shard_set(tmp_path)
    assert names(found) == [shard_name(0), shard_name(1)] and found.manifest is None and found.entries is None


@pytest.mark.parametrize("spec, words", [
    ("missing-folder", "does not exist"),
    ("shards/shard-{000000..000001}.tar", "not .tar files"),
    ("", "no shard set"),
])
def test_what_names_no_shards_is_refused_with_the_accepted_forms(tmp_path, spec, words):
    with pytest.raises(ShardSetError) as info:
        resolve_shard_set(str(tmp_path / spec) if spec else spec)
    assert words in str(info.value)
    if spec and "{" not in spec:
        assert "brace pattern" in str(info.value)  # says what would have been accepted


@pytest.mark.parametrize("name", ["../outside.tar", "/etc/passwd", "sub/shard.tar", "..", ""])
def test_a_manifest_name_that_is_not_a_plain_file_name_is_refused(reference_copy, name):
    path = reference_copy / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["shards"][1]["name"] = name
    path.write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match="plain file name"):
        resolve_shard_set(reference_copy)


def test_a_listed_shard_that_links_out_of_the_folder_or_is_a_fifo_is_refused(reference_copy, tmp_path):
    outside = tmp_path / "elsewhere.tar"
    outside.write_bytes((reference_copy / shard_name(1)).read_bytes())
    (reference_copy / shard_name(1)).unlink()
    (reference_copy / shard_name(1)).symlink_to(outside)
    with pytest.raises(ManifestError, match="outside the set's folder"):
        resolve_shard_set(reference_copy)
    (reference_copy / shard_name(1)).unlink()
    os.mkfifo(reference_copy / shard_name(1))
    with pytest.raises(ManifestError, match="not a regular file"):
        resolve_shard_set(reference_copy / "manifest.json")


def test_a_link_inside_the_folder_is_fine(reference_copy):
    (reference_copy / "copy-of-1.tar").write_bytes((reference_copy / shard_name(1)).read_bytes())
    (reference_copy / shard_name(1)).unlink()
    (reference_copy / shard_name(1)).symlink_to("copy-of-1.tar")
    assert len(resolve_shard_set(reference_copy).tars) == REFERENCE_SHARDS
