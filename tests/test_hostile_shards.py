"""`datagen verify`, `trainer inspect` and `datagen preview` on damaged and hostile shard sets:
each bad shard or sample is reported by name, the rest is read, and no traceback is printed."""
from __future__ import annotations

import json

import pytest
from conftest import all_output, make_runner

from datagen.cli import main as datagen_main
from datagen.format.manifest import samples_name
from datagen.format.shards import ShardWriter, iter_tar_samples, sample_key, shard_name
from trainer.cli import main as trainer_main

BAD_SHARD, BAD_INDEX = 1, 2


def rewrite_json(out, change) -> str:
    """Apply ``change`` to the JSON of sample (BAD_SHARD, BAD_INDEX); returns its key."""
    tar = out / shard_name(BAD_SHARD)
    samples = list(iter_tar_samples(tar))
    samples[BAD_INDEX]["json"] = change(json.loads(samples[BAD_INDEX]["json"]))
    with ShardWriter(tar) as writer:
        for sample in samples:
            writer.write(sample)
    return samples[BAD_INDEX]["__key__"]


def damage(out, kind: str) -> str:
    """Damage the set at ``out``; returns the words the report must contain."""
    if kind == "json_is_a_list":
        return rewrite_json(out, lambda meta: b"[1, 2]")
    if kind == "warp_is_garbage":
        def garbage(meta):
            meta["objects"][0]["warp"]["affine"] = "x"
            return json.dumps(meta).encode()
        return rewrite_json(out, garbage)
    if kind == "truncated_tar":
        tar = out / shard_name(BAD_SHARD)
        tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])
        return shard_name(BAD_SHARD)
    if kind == "nested_manifest":
        (out / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
        return "manifest.json"
    if kind == "entry_without_checksum":
        manifest = json.loads((out / "manifest.json").read_text())
        del manifest["shards"][BAD_SHARD]["sha256"]
        (out / "manifest.json").write_text(json.dumps(manifest))
        return "shard entry 1: sha256"
    if kind == "garbled_sample_rows":
        (out / samples_name(BAD_SHARD)).write_bytes(b"PAR1 not parquet at all")
        return samples_name(BAD_SHARD)
    raise ValueError(kind)


KINDS = ["json_is_a_list", "warp_is_garbage", "truncated_tar", "nested_manifest", "entry_without_checksum",
         "garbled_sample_rows"]


def run(main, args):
    result = make_runner().invoke(main, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result, all_output(result)


@pytest.mark.parametrize("kind", KINDS)
def test_verify_reports_and_goes_on(reference_copy, kind):
    words = damage(reference_copy, kind)
    result, text = run(datagen_main, ["verify", reference_copy, "--quiet"])
    assert result.exit_code == 1 and words in text and "Traceback" not in text, text
    if kind in ("json_is_a_list", "warp_is_garbage", "garbled_sample_rows"):  # the others were read in full
        assert "20 samples in 4 shards checked" in text, text


@pytest.mark.parametrize("kind", [kind for kind in KINDS  # warps and sample rows: verify's job
                                  if kind not in ("warp_is_garbage", "garbled_sample_rows")])
def test_inspect_reports_and_goes_on(reference_copy, kind):
    words = damage(reference_copy, kind)
    result, text = run(trainer_main, ["inspect", reference_copy])
    assert result.exit_code in (1, 2) and words in text and "Traceback" not in text, text
    if kind == "json_is_a_list":
        assert "samples: 19" in text and f"BAD sample {sample_key(BAD_SHARD, BAD_INDEX)}" in text, text


@pytest.mark.parametrize("kind", ["json_is_a_list", "truncated_tar", "nested_manifest"])
def test_preview_skips_what_it_cannot_read(reference_copy, tmp_path, kind):
    words = damage(reference_copy, kind)
    page = tmp_path / "p.html"
    result, text = run(datagen_main, ["preview", reference_copy, "--out", page, "-n", "20"])
    assert words in text and "Traceback" not in text, text
    if kind == "nested_manifest":
        assert result.exit_code == 1 and not page.exists()
    else:
        assert result.exit_code == 0 and "pairs drawn" in text and page.stat().st_size > 0
