"""The lost segment source (datagen.segments.lost_source): folder listing and identity, the scan with a
random-weights DINO, and ``datagen segments/build --segments lost`` end to end.

Random weights give arbitrary (but valid) segments: these tests check the plumbing, not LOST's
quality (tests/test_lost.py checks the maths)."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import all_output, build_args, run_cli
from official_weights import official_state
from pycocotools import mask as mask_utils
from synthetic import SAMPLE_IMAGES

from datagen.segments import get_source, source_inputs
from datagen.segments.bank import ImageRow, SegmentBank, SegmentRow, Skipped, write_bank
from datagen.segments.dino import DINO_ENV, DINO_FILE, DinoWeightsError
from datagen.segments.lost_source import CATEGORY, LostConfig, LostSource, folder_fingerprint, image_files, working_size
from datagen.segments.refine import decode_soft, encode_soft
from datagen.synth.sampling import Sampler

MAX_SIZE = 96
"""Images are processed at 96 px (6 x 4 patches): fast, and exercises the downscaling."""


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A random ViT-S/16 saved as the official file (DINO's key names; values independent of timm)."""
    path = tmp_path_factory.mktemp("weights") / DINO_FILE
    torch.save(official_state(), path)
    return path


@pytest.fixture
def images(tmp_path):
    """Four images of the embedded sample (one in a subfolder), a corrupt file, a hidden file and a text file."""
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    files = sorted(SAMPLE_IMAGES.glob("*.jpg"))[:4]
    for name, source in zip(["b.jpg", "a.JPG", "sub/c.png", "d.jpeg"], files):
        if name.endswith(".png"):
            import cv2

            cv2.imwrite(str(folder / name), cv2.imread(str(source)))
        else:
            shutil.copy(source, folder / name)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    (folder / ".hidden.jpg").write_bytes(b"")
    (folder / "notes.txt").write_text("not an image")
    return folder


@pytest.fixture(autouse=True)
def no_cached_weights(tmp_path, monkeypatch):
    """Weights come only from what a test passes, never from this machine's caches."""
    monkeypatch.delenv(DINO_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "no-cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "no-torch"))


def test_image_files_are_recursive_sorted_and_only_images(images):
    assert image_files(images) == ["a.JPG", "b.jpg", "broken.jpg", "d.jpeg", "sub/c.png"]


def test_folder_fingerprint_follows_additions_renames_and_rewrites(images):
    first = folder_fingerprint(images)
    assert folder_fingerprint(images) == first
    (images / "notes.txt").write_text("ignored: not an image")
    assert folder_fingerprint(images) == first
    changes = [lambda: (images / "e.png").write_bytes(b"x"),
               lambda: (images / "e.png").rename(images / "f.png"),
               lambda: os.utime(images / "f.png", ns=(1, 1))]
    seen = {first}
    for change in changes:
        change()
        seen.add(folder_fingerprint(images))
    assert len(seen) == 4


@pytest.mark.slow
def test_inputs_change_with_the_weights_and_settings_but_not_the_device(images, weights, tmp_path):
    base = source_inputs("lost", images_dir=images, dino_weights=weights)
    assert base.image_root == images.resolve()
    assert base.record["images"] == 5 and base.record["lost"] == LostConfig().to_dict()
    assert source_inputs("lost", images_dir=images, dino_weights=weights, device="cuda") == base
    other_weights = tmp_path / "other.pth"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one byte of a tensor
    other_weights.write_bytes(bytes(data))
    changed = [source_inputs("lost", images_dir=images, dino_weights=other_weights),
               source_inputs("lost", images_dir=images, dino_weights=weights, max_size=512),
               source_inputs("lost", images_dir=images, dino_weights=weights, k=50)]
    assert len({base.sha256, *(inputs.sha256 for inputs in changed)}) == 4


def test_options_are_typed_and_an_unknown_one_is_an_error_naming_it(images, weights):
    from datagen.runner.inputs import SourceSpec
    from datagen.segments.lost_source import LostOptions

    for call in (lambda: get_source("lost", images_dir=images, dino_weights=weights, max_sise=64),
                 lambda: source_inputs("lost", images_dir=images, dino_weights=weights, max_sise=64),
                 lambda: SourceSpec("lost", {"images_dir": images, "max_sise": 64})):
        with pytest.raises(ValueError, match="unknown option 'max_sise' of the lost source; its options: images_dir"):
            call()
    with pytest.raises(ValueError, match="max_size"):
        LostOptions(images_dir=images, max_size=16)
    spec = SourceSpec("lost", {"images_dir": images, "dino_weights": weights, "device": "cpu"})
    assert spec.options == LostOptions(images_dir=images, dino_weights=weights, device="cpu")
    assert source_inputs("lost", **spec.kwargs()) == source_inputs("lost", images_dir=images, dino_weights=weights)


def test_the_recorded_options_are_those_recorded_before_they_were_typed(images, weights):
    """The command's record of the lost options is unchanged (a bank is current only if it is
    equal), leaves out the runtime options, and names k only when it is not LOST's."""
    from datagen.runner.inputs import SourceSpec

    given = {"images_dir": images, "max_size": 1024, "device": "cuda", "progress": False, "dino_weights": weights}
    old = {k: str(v) for k, v in sorted(given.items()) if k not in ("device", "batch_size", "progress")}
    assert SourceSpec("lost", given).to_json() == {"name": "lost", "options": old}
    assert SourceSpec("lost", {**given, "k": 50}).to_json()["options"] == {**old, "k": "50"}


def test_a_max_size_out_of_range_is_a_usage_error_before_any_work(images, tmp_path):
    out = tmp_path / "out"
    result = run_cli(build_args(out, extra=["--segments", "lost", "--images", images, "--max-size", 16]), expect=2)
    assert "--max-size" in all_output(result) and not out.exists()


def test_without_weights_the_error_names_the_file_to_get(images):
    with pytest.raises(DinoWeightsError, match=f"{DINO_FILE}.*dl.fbaipublicfiles.com"):
        get_source("lost", images_dir=images)
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        get_source("lost", images_dir=images / "nope")


def test_working_size_caps_the_longest_side():
    assert working_size(640, 480, 0) == (640, 480)
    assert working_size(640, 480, 1024) == (640, 480)
    assert working_size(640, 480, 320) == (320, 240)
    assert working_size(300, 1000, 100) == (30, 100)


def test_scan_yields_images_segments_and_skips(images, weights):
    source = LostSource(images, weights, LostConfig(max_size=MAX_SIZE), min_area=0, progress=False)
    items = list(source.scan())
    rows = [item for item in items if isinstance(item, ImageRow)]
    segments = [item for item in items if isinstance(item, SegmentRow)]
    skipped = [item for item in items if isinstance(item, Skipped)]
    assert [row.image_path for row in rows] == ["a.JPG", "b.jpg", "d.jpeg", "sub/c.png"]
    assert [row.image_id for row in rows] == [1, 2, 4, 5]  # position in the sorted listing
    assert [(s.kind, s.ident) for s in skipped] == [("image", "broken.jpg")]
    assert "broken.jpg" in skipped[0].reason and "JPEG" in skipped[0].reason
    assert [s.image_id for s in segments] == [1, 2, 4, 5]
    for row, segment in zip(rows, segments):
        assert (segment.image_width, segment.image_height) == (row.width, row.height) == (400, row.height)
        assert segment.category == CATEGORY and segment.category_id == segment.segment_id == segment.image_id
        size = [segment.image_height, segment.image_width]
        mask = mask_utils.decode({"size": size, "counts": segment.rle.encode()})
        coarse = mask_utils.decode({"size": size, "counts": segment.coarse_rle.encode()})
        assert mask.sum() == segment.area > 0
        assert tuple(mask_utils.toBbox({"size": size, "counts": segment.rle.encode()})) == segment.bbox
        assert 0 <= segment.score <= 1 and 0 <= segment.refine_iou <= 1
        iou = np.logical_and(mask, coarse).sum() / np.logical_or(mask, coarse).sum()
        if segment.refine_iou < 0.5:  # fallback: the segment is the coarse mask
            np.testing.assert_array_equal(mask, coarse)
        else:  # IoU at full resolution, close to the one measured at the working size
            assert iou == pytest.approx(segment.refine_iou, abs=0.05)
        soft = decode_soft(segment.soft_png)  # the solver's output, at the size the solver ran at
        assert soft.shape[::-1] == working_size(row.width, row.height, MAX_SIZE) and soft.dtype == np.uint8


def test_min_area_skips_small_segments_but_keeps_their_images(images, weights):
    source = LostSource(images, weights, LostConfig(max_size=MAX_SIZE), min_area=1e9, progress=False)
    items = list(source.scan())
    assert not [item for item in items if isinstance(item, SegmentRow)]
    assert len([item for item in items if isinstance(item, ImageRow)]) == 4
    reasons = [item.reason for item in items if isinstance(item, Skipped) and item.kind == "annotation"]
    assert len(reasons) == 4 and all("min_area" in reason for reason in reasons)


def test_banks_without_the_coarse_column_still_load(tmp_path):
    mask = np.ones((4, 4), np.uint8)
    rle = mask_utils.encode(np.asfortranarray(mask))["counts"].decode()
    row = SegmentRow(source="lost", image_id=1, image_path="a.jpg", image_width=4, image_height=4, segment_id=1,
                     category_id=1, category="object", bbox=(0.0, 0.0, 4.0, 4.0), area=16.0, rle=rle, score=0.5,
                     refine_iou=0.75, coarse_rle=rle)
    write_bank([row], tmp_path)
    assert SegmentBank.load(tmp_path).row(0) == row
    table = pq.read_table(tmp_path / "segments.parquet")
    pq.write_table(table.drop(["coarse_rle"]), tmp_path / "segments.parquet")  # a bank of before the column
    assert SegmentBank.load(tmp_path).row(0).coarse_rle is None


def soft_row(image_id: int, soft_png: bytes | None) -> SegmentRow:
    rle = mask_utils.encode(np.asfortranarray(np.ones((4, 4), np.uint8)))["counts"].decode()
    return SegmentRow(source="lost", image_id=image_id, image_path=f"{image_id}.jpg", image_width=4, image_height=4,
                      segment_id=image_id, category_id=image_id, category="object", bbox=(0.0, 0.0, 4.0, 4.0),
                      area=16.0, rle=rle, score=0.5, refine_iou=0.75, coarse_rle=rle, soft_png=soft_png)


def test_rows_without_soft_outputs_write_the_bytes_of_before_the_column(tmp_path):
    """COCO's banks (and any source that keeps no soft output) do not change: segments.parquet is
    written with the schema of before ``soft_png`` existed, byte for byte."""
    from datagen.segments.bank import SEGMENT_SCHEMA

    rows = [soft_row(i, None) for i in (1, 2, 3)]
    write_bank(rows, tmp_path / "bank")
    before = SEGMENT_SCHEMA.remove(SEGMENT_SCHEMA.get_field_index("soft_png"))
    with pq.ParquetWriter(tmp_path / "before.parquet", before, compression="zstd") as writer:
        writer.write_table(pa.table({name: [getattr(row, name) for row in rows] for name in before.names},
                                    schema=before))
    assert (tmp_path / "bank" / "segments.parquet").read_bytes() == (tmp_path / "before.parquet").read_bytes()
    write_bank([], tmp_path / "empty")
    assert "soft_png" not in pq.read_schema(tmp_path / "empty" / "segments.parquet").names


def test_soft_outputs_are_stored_but_never_loaded_with_the_bank(tmp_path, monkeypatch):
    import datagen.segments.bank as bank_module

    monkeypatch.setattr(bank_module, "_ROW_GROUP_BYTES", 200)  # a row group per few rows
    softs = {i: encode_soft(np.full((3, 5), i / 10)) for i in range(1, 9)}
    write_bank([soft_row(i, data) for i, data in softs.items()], tmp_path)
    stored = pq.read_table(tmp_path / "segments.parquet", columns=["image_id", "soft_png"]).to_pylist()
    assert {row["image_id"]: row["soft_png"] for row in stored} == softs
    assert pq.ParquetFile(tmp_path / "segments.parquet").metadata.num_row_groups > 1
    bank = SegmentBank.load(tmp_path)
    assert "soft_png" not in bank._segments.column_names and bank.row(0).soft_png is None


def test_a_soft_output_after_a_first_row_group_without_any_is_an_error(tmp_path, monkeypatch):
    import datagen.segments.bank as bank_module

    monkeypatch.setattr(bank_module, "_ROW_GROUP_ROWS", 2)
    with pytest.raises(ValueError, match="soft_png"):
        write_bank([soft_row(1, None), soft_row(2, None), soft_row(3, encode_soft(np.zeros((2, 2))))], tmp_path)


def test_a_category_per_segment_leaves_every_other_image_as_a_background(tmp_path):
    rle = mask_utils.encode(np.asfortranarray(np.ones((4, 4), np.uint8)))["counts"].decode()
    rows = [SegmentRow(source="lost", image_id=i, image_path=f"{i}.jpg", image_width=4, image_height=4,
                       segment_id=i, category_id=i, category="object", bbox=(0.0, 0.0, 4.0, 4.0), area=16.0,
                       rle=rle) for i in (3, 1, 2)]
    write_bank(rows + [ImageRow("lost", i, f"{i}.jpg", 4, 4) for i in (1, 2, 3)], tmp_path)
    bank = SegmentBank.load(tmp_path)
    sampler = Sampler(bank, __import__("datagen.config", fromlist=["BuildConfig"]).BuildConfig())
    assert {c: r.tolist() for c, r in sampler.rows_by_category.items()} == {1: [1], 2: [2], 3: [0]}
    rng = np.random.default_rng(0)
    plans = [sampler.plan(rng, 1) for _ in range(30)]
    assert all(plan.background_image != plan.source_image for plan in plans)
    assert {plan.background_image for plan in plans} == {1, 2, 3}


# -- command line ------------------------------------------------------------------------------

def lost_args(images, weights, *extra):
    return ["--images", images, "--dino-weights", weights, "--max-size", MAX_SIZE, *extra]


@pytest.mark.slow
def test_segments_lost_writes_a_bank_and_reuses_it_until_an_input_changes(images, weights, tmp_path, monkeypatch):
    import datagen.runner.inputs

    out = tmp_path / "bank"
    command = ["segments", "--source", "lost", *lost_args(images, weights), "--min-area", 0, "--out", out,
               "--no-progress"]
    result = run_cli(command)
    assert f"{out}: 4 segments, 4 images, 1 skipped" in result.output
    assert "kept LOST's coarse mask" in result.output
    inputs = json.loads((out / "inputs.json").read_text())
    assert inputs["lost"]["max_size"] == MAX_SIZE and inputs["images"] == 5
    assert "device" not in inputs["source"]["options"]
    bank = SegmentBank.load(out)
    assert len(bank) == 4 and bank.summary.source == "lost"

    real_get_source = datagen.runner.inputs.get_source

    def no_scan(*args, **kwargs):
        raise AssertionError("LOST ran again although the bank is current")

    monkeypatch.setattr(datagen.runner.inputs, "get_source", no_scan)
    run_cli(command)  # current: not scanned again
    monkeypatch.setattr(datagen.runner.inputs, "get_source", real_get_source)
    os.utime(images / "b.jpg", ns=(5, 5))
    assert "scanning lost segments" in all_output(run_cli(command))
    command[command.index("--max-size") + 1] = 64
    assert "scanning lost segments" in all_output(run_cli(command))
    assert json.loads((out / "inputs.json").read_text())["lost"]["max_size"] == 64


def test_segments_lost_without_images_or_weights_are_clear_errors(images, tmp_path):
    result = run_cli(["segments", "--source", "lost", "--out", tmp_path / "bank"], expect=2)
    assert "--images" in all_output(result)
    result = run_cli(["segments", "--source", "lost", "--images", images, "--out", tmp_path / "bank"], expect=1)
    message = all_output(result)
    assert DINO_FILE in message and "https://dl.fbaipublicfiles.com/dino/" in message and "--dino-weights" in message
    assert not (tmp_path / "bank").exists()


@pytest.mark.slow
def test_build_with_lost_segments_makes_pairs_and_resumes_without_lost(images, weights, tmp_path, monkeypatch):
    import datagen.runner.inputs

    out = tmp_path / "out"
    args = build_args(out, n=4, shard_size=2, extra=["--segments", "lost", *lost_args(images, weights),
                                                     "--image-size", 64])
    result = run_cli(args)
    assert "4 pairs in 2 shards" in result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["objects"] == "1"
    assert manifest["inputs"]["segments"]["name"] == "lost"
    assert manifest["inputs"]["dino_weights_sha256"] and manifest["inputs"]["images_sha256"]
    rows = pa.concat_tables([pq.read_table(p) for p in sorted(out.glob("shard-*.parquet"))]).to_pylist()
    accepted = [row for row in rows if row["status"] == "accepted"]
    assert len(accepted) == 4
    assert all(row["background_image_id"] != row["source_image_id"] for row in accepted)

    (out / "shard-000001.stats.json").unlink()
    monkeypatch.setattr(datagen.runner.inputs, "get_source", lambda *a, **k: pytest.fail("LOST ran again on resume"))
    assert "resuming: 1 of 2 shards" in all_output(run_cli(args))


def test_build_with_lost_refuses_two_object_pairs(images, weights, tmp_path):
    out = tmp_path / "out"
    result = run_cli(build_args(out, n=2, extra=["--segments", "lost", *lost_args(images, weights),
                                                 "--objects", "mix"]), expect=2)
    assert "--objects 1" in all_output(result)
    assert not out.exists()


def test_segments_subcommands_and_lost_options_are_documented():
    from datagen.cli import main

    group = main.commands["segments"]
    for command in (main.commands["build"], group.commands["scan"], group.commands["eval"]):
        for param in command.params:
            if param.param_type_name == "option":
                assert param.help, f"{command.name} {param.opts[0]} has no help text"
    scan_help = run_cli(["segments", "scan", "--help"]).output
    for option in ("--source", "--images", "--dino-weights", "--max-size", "--device"):
        assert option in scan_help, option
    build_help = run_cli(["build", "--help"]).output
    for option in ("--images", "--dino-weights", "--max-size", "--dino-device"):
        assert option in build_help, option
