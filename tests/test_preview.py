"""Tests of datagen.preview: pair rendering, contact sheets, PNG and HTML previews."""
from __future__ import annotations

import base64
import re

import cv2
import numpy as np
import pytest
from synthetic import GREY, shifted_square_pair

from datagen.format.draw import GAP, correspondence_points, overlay_mask, render_contact_sheet, render_pair
from datagen.format.schema import PairSample, encode_sample
from datagen.format.shards import ShardWriter, sample_key, shard_name
from datagen.preview import write_preview


def make_sample(key: str, shift: int = 8, size: int = 64, grid: int = 4) -> PairSample:
    return shifted_square_pair(key, shift, size, grid)


def test_render_pair_shape_and_type():
    image = render_pair(make_sample("k"))
    assert image.shape == (64, 2 * 64 + GAP, 3) and image.dtype == np.uint8


def test_lines_end_where_src_to_tgt_says():
    sample = make_sample("k", shift=8)
    sample.tgt_mask[:] = 0  # no overlay on the target: any change there is a line or a circle
    plain = render_pair(sample, n_lines=0)
    drawn = render_pair(sample, n_lines=4, seed=3)
    points = correspondence_points(sample, n_lines=4, seed=3)
    assert len(points) == 4  # the 4 cells of the 2x2 mask
    for (xs, ys), (xt, yt) in points:
        # source points are cell centres inside the grid mask, targets shifted by 8 px
        assert (xt, yt) == pytest.approx((xs + 8, ys))
        end = (int(round(yt)), int(round(xt)) + 64 + GAP)
        assert np.abs(drawn[end].astype(int) - plain[end].astype(int)).sum() > 60
        start = (int(round(ys)), int(round(xs)))
        assert np.abs(drawn[start].astype(int) - plain[start].astype(int)).sum() > 60
    # far from every end point and segment, the target is untouched
    assert np.array_equal(drawn[2:6, 64 + GAP + 2: 64 + GAP + 6], plain[2:6, 64 + GAP + 2: 64 + GAP + 6])


def test_only_masked_cells_are_used():
    sample = make_sample("k")
    points = correspondence_points(sample, n_lines=100)
    cells = {(int(ys // 16), int(xs // 16)) for (xs, ys), _ in points}
    assert cells == {(1, 1), (1, 2), (2, 1), (2, 2)}
    assert correspondence_points(sample, 4, seed=1) == correspondence_points(sample, 4, seed=1)
    sample.src_grid_mask[:] = 0
    assert correspondence_points(sample) == []
    render_pair(sample)  # nothing to draw is fine


def test_mask_fill_only_inside_mask():
    sample = make_sample("k")
    out = overlay_mask(sample.src_image, sample.src_mask, fill=True)
    inside = sample.src_mask > 0
    ring = cv2.dilate(sample.src_mask, np.ones((5, 5), np.uint8)) > 0
    assert (out[inside] != GREY).any(axis=-1).all()
    assert (out[~ring] == GREY).all()
    # and in the rendered pair (no lines), away from the label at the bottom
    pair = render_pair(sample, n_lines=0, fill=True)
    src = pair[:, :64]
    assert (src[:40][~ring[:40]] == GREY).all()
    assert (src[20:44, 20:44] != GREY).any(axis=-1).all()


def test_outlines_leave_the_object_visible():
    """The default draws outlines only: the object's own pixels, inside the outline, are untouched,
    so a person can judge the paste."""
    sample = make_sample("k")
    out = overlay_mask(sample.src_image, sample.src_mask)
    interior = cv2.erode(sample.src_mask, np.ones((7, 7), np.uint8)) > 0
    boundary = (cv2.dilate(sample.src_mask, np.ones((3, 3), np.uint8)) > 0) & ~(
        cv2.erode(sample.src_mask, np.ones((3, 3), np.uint8)) > 0)
    assert interior.any() and np.array_equal(out[interior], sample.src_image[interior])
    assert (out[boundary] != GREY).any(axis=-1).mean() > 0.9
    ring = cv2.dilate(sample.src_mask, np.ones((7, 7), np.uint8)) > 0
    assert (out[~ring] == GREY).all()


def test_two_objects_get_different_colours():
    sample = make_sample("k")
    sample.src_mask[16:48, 32:48] = 2
    for fill in (True, False):
        out = overlay_mask(sample.src_image, sample.src_mask, fill=fill)
        assert not np.array_equal(out[16, 20], out[16, 40])


def test_contact_sheet():
    samples = [make_sample(sample_key(0, i)) for i in range(3)]
    sheet = render_contact_sheet(samples, columns=2)
    assert sheet.dtype == np.uint8 and sheet.ndim == 3
    assert 2 * 480 <= sheet.shape[1] <= 2 * 480 + 64
    with pytest.raises(ValueError):
        render_contact_sheet([])


def write_shards(tmp_path, counts):
    paths = []
    for index, count in enumerate(counts):
        path = tmp_path / shard_name(index)
        with ShardWriter(path) as writer:
            for i in range(count):
                writer.write(encode_sample(make_sample(sample_key(index, i), shift=4 + i), 90))
        paths.append(path)
    return paths


def test_write_preview_png(tmp_path):
    paths = write_shards(tmp_path, [2, 3])
    out = tmp_path / "preview" / "sheet.png"
    assert write_preview(paths, out, n=4) == 4
    image = cv2.imread(str(out), cv2.IMREAD_COLOR)
    assert image is not None and image.shape[1] >= 480
    assert write_preview(paths, tmp_path / "all.jpg", n=16) == 5
    assert cv2.imread(str(tmp_path / "all.jpg")) is not None


def test_write_preview_html(tmp_path):
    paths = write_shards(tmp_path, [2, 2])
    out = tmp_path / "preview.html"
    assert write_preview(paths, out, n=3) == 3
    page = out.read_text()
    images = re.findall(r'<img src="data:image/jpeg;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == page.count("<img") == 3
    for key in (sample_key(0, 0), sample_key(0, 1), sample_key(1, 0)):
        assert key in page
    assert sample_key(1, 1) not in page
    assert "dog" in page and "101" in page and "202" in page
    decoded = cv2.imdecode(np.frombuffer(base64.b64decode(images[0]), np.uint8), cv2.IMREAD_COLOR)
    assert decoded is not None and decoded.shape[0] == 64


def test_write_preview_errors(tmp_path):
    paths = write_shards(tmp_path, [1])
    with pytest.raises(ValueError, match="extension"):
        write_preview(paths, tmp_path / "preview.gif")
    empty = write_shards(tmp_path / "empty", [0])
    with pytest.raises(ValueError, match="no samples"):
        write_preview(empty, tmp_path / "p.png")


def test_a_stylised_pair_gets_a_second_row_with_its_stylised_images():
    sample = make_sample("k")
    sample.src_style_image = np.full_like(sample.src_image, 30)
    sample.tgt_style_image = np.full_like(sample.tgt_image, 220)
    plain = render_pair(make_sample("k"))
    image = render_pair(sample)
    height, width = sample.src_image.shape[:2]
    assert image.shape[0] == 2 * plain.shape[0] + GAP
    assert np.array_equal(image[:plain.shape[0]], plain)
    lower = image[plain.shape[0] + GAP:]
    assert (lower[:height, :width] == 30).all() and (lower[:height, -width:] == 220).all()
