"""Co-segmentation, its scores and the cluster page of discovery (trainer.discovery.coseg, .metrics,
.clusters): GrabCut's seed checked label by label, GrabCut on a synthetic object, P and J on
hand-made masks, the datasets' folder layouts on tiny folders, k-means on separated blobs, and the
cluster page's files."""
from __future__ import annotations

import re
from pathlib import Path

import cv2
import numpy as np
import pytest

from datagen.format.imageio import BadInput
from trainer.discovery.clusters import (
    Cluster,
    cluster_regions,
    crop_box,
    kmeans,
    thumb_size,
    write_cluster_page,
)
from trainer.discovery.coseg import CosegOptions, CosegResult, cosegment, grabcut_seed
from trainer.discovery.metrics import (
    LayoutError,
    class_scores,
    evaluate_folder,
    load_mask,
    precision_jaccard,
    read_internet_class,
    read_msrc_class,
)

B, F, PB, PF = cv2.GC_BGD, cv2.GC_FGD, cv2.GC_PR_BGD, cv2.GC_PR_FGD


def write_png(path: Path, array: np.ndarray) -> Path:
    """Write a grey (H, W) or RGB (H, W, 3) uint8 array as PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if array.ndim == 3:
        array = array[:, :, ::-1]
    assert cv2.imwrite(str(path), np.ascontiguousarray(array))
    return path


def box_mask(shape, y0, y1, x0, x1) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[y0:y1, x0:x1] = True
    return mask


# -- GrabCut's seed ----------------------------------------------------------------------------

def test_grabcut_seed_labels_by_hand():
    potential = np.zeros((6, 7), np.float32)
    potential[2, 3] = 1.0   # the maximum: > 0.6 -> definite foreground
    potential[2, 4] = 0.5   # positive, under 0.6 -> probable foreground
    potential[3, 3] = 0.6   # exactly at the threshold -> probable foreground
    potential[5, 0] = -2.0  # negative counts as zero
    expected = np.array([
        [B, B, B, B, B, B, B],
        [B, B, PB, PB, PB, PB, B],
        [B, B, PB, F, PF, PB, B],
        [B, B, PB, PF, PB, PB, B],
        [B, B, PB, PB, PB, B, B],
        [B, B, B, B, B, B, B],
    ], np.uint8)
    labels = grabcut_seed(potential, fg_ratio=0.6, dilate=3)
    assert labels.dtype == np.uint8
    np.testing.assert_array_equal(labels, expected)


def test_grabcut_seed_even_dilation_no_ring_and_no_positive():
    potential = np.zeros((4, 4))
    potential[1, 1] = 2.0
    # an even side: cv2.dilate's anchor is at the square's centre, the ring grows right and down
    expected = np.full((4, 4), B, np.uint8)
    expected[1, 1] = F
    expected[1, 2] = expected[2, 1] = expected[2, 2] = PB
    np.testing.assert_array_equal(grabcut_seed(potential, dilate=2), expected)
    no_ring = np.full((4, 4), B, np.uint8)
    no_ring[1, 1] = F
    np.testing.assert_array_equal(grabcut_seed(potential, dilate=0), no_ring)
    np.testing.assert_array_equal(grabcut_seed(potential, dilate=1), no_ring)
    assert (grabcut_seed(np.zeros((5, 5))) == B).all()
    assert (grabcut_seed(-np.ones((5, 5))) == B).all()
    with pytest.raises(ValueError, match="NaN"):
        grabcut_seed(np.full((3, 3), np.nan))
    with pytest.raises(ValueError, match="fg_ratio"):
        CosegOptions(fg_ratio=1.5)


# -- cosegment on a synthetic object --------------------------------------------------------------

def blob_scene(height=96, width=128):
    """(image, blob mask): an orange ellipse on a green-grey noise texture."""
    rng = np.random.default_rng(3)
    noise = rng.normal(0, 1, (height, width, 3)).astype(np.float32)
    texture = cv2.GaussianBlur(noise, (0, 0), 1.5)
    base = np.array([90, 120, 95], np.float32)
    image = np.clip(base + 40 * texture / texture.std(), 0, 255).astype(np.uint8)
    blob = np.zeros((height, width), np.uint8)
    cv2.ellipse(blob, (70, 50), (28, 20), 15, 0, 360, 1, -1)
    blob = blob.astype(bool)
    image[blob] = np.clip(np.array([230, 120, 30]) + rng.normal(0, 8, (blob.sum(), 3)), 0, 255).astype(np.uint8)
    return image, blob


def blob_potential(grid=(12, 16)):
    """Positive over the blob and some of its surroundings, peaked on the blob's left half."""
    rows, cols = np.mgrid[0:grid[0], 0:grid[1]]
    # cell centres in pixels of the 96 x 128 image: cells are 8 x 8
    y, x = (rows + 0.5) * 8, (cols + 0.5) * 8
    potential = np.exp(-(((x - 58) / 18) ** 2 + ((y - 48) / 14) ** 2))
    potential[potential < 0.05] = 0
    return potential


def iou(a, b):
    return (a & b).sum() / (a | b).sum()


def test_cosegment_recovers_the_blob_and_is_deterministic():
    image, blob = blob_scene()
    potential = blob_potential()
    labels = grabcut_seed(cv2.resize(potential.astype(np.float32), (128, 96), interpolation=cv2.INTER_LINEAR))
    seed_fg = np.isin(labels, (F, PF))
    assert iou(labels == F, blob) < 0.6 and seed_fg.sum() > 1.3 * blob.sum()  # the seed alone is not the answer
    result = cosegment(image, potential)
    assert isinstance(result, CosegResult) and result.grabcut and result.note is None
    assert result.mask.dtype == bool and result.mask.shape == blob.shape
    assert iou(result.mask, blob) > 0.8
    # the same result whatever OpenCV's random state was before
    cv2.setRNGSeed(12345)
    cv2.randu(np.zeros((1000,), np.float32), 0, 1)
    again = CosegOptions().run(image, potential)
    np.testing.assert_array_equal(again.mask, result.mask)


def test_cosegment_is_deterministic_on_a_photograph():
    """On a real photograph GrabCut's k-means start matters (with OpenCV 5.1, seeds 0-5 give 5
    different masks here, and unseeded runs one after the other differ): the seed makes the mask
    independent of what used OpenCV's random state before."""
    from skimage import data

    image = cv2.resize(data.astronaut(), (128, 128), interpolation=cv2.INTER_AREA)
    potential = np.zeros((16, 16))
    potential[3:10, 4:11] = np.random.default_rng(0).random((7, 7))
    first = cosegment(image, potential, seed=0)
    cosegment(image, potential, seed=1)
    cv2.setRNGSeed(99)
    cv2.randu(np.zeros((1000,), np.float32), 0, 1)
    second = cosegment(image, potential, seed=0)
    assert first.grabcut and first.mask.any()
    np.testing.assert_array_equal(first.mask, second.mask)


def test_cosegment_cannot_run():
    image, _ = blob_scene()
    empty = cosegment(image, np.zeros((12, 16)))
    assert not empty.grabcut and not empty.mask.any() and "no positive" in empty.note
    everywhere = cosegment(image, np.ones((12, 16)))
    assert not everywhere.grabcut and everywhere.mask.all() and "no background" in everywhere.note
    with pytest.raises(ValueError, match="uint8"):
        cosegment(image.astype(np.float32), np.ones((2, 2)))


# -- scores --------------------------------------------------------------------------------------

def test_precision_jaccard_by_hand():
    truth = box_mask((4, 5), 0, 2, 0, 3)   # 6 pixels
    pred = box_mask((4, 5), 1, 3, 1, 4)    # 6 pixels, 2 shared: union 10, 8 pixels differ
    precision, jaccard = precision_jaccard(pred, truth)
    assert precision == pytest.approx(12 / 20) and jaccard == pytest.approx(2 / 10)
    assert precision_jaccard(truth, truth) == (1.0, 1.0)
    precision, jaccard = precision_jaccard(box_mask((4, 5), 0, 1, 0, 3), np.zeros((4, 5), bool))
    assert precision == pytest.approx(17 / 20) and jaccard is None
    assert precision_jaccard(pred.astype(np.uint8) * 255, truth) == precision_jaccard(pred, truth)
    with pytest.raises(ValueError, match=r"\(4, 5\).*\(5, 4\)"):
        precision_jaccard(pred, np.zeros((5, 4), bool))
    with pytest.raises(TypeError, match="threshold"):
        precision_jaccard(pred.astype(np.float32), truth)


def test_class_scores():
    truth = box_mask((4, 5), 0, 2, 0, 3)
    scores = class_scores({"a": box_mask((4, 5), 1, 3, 1, 4), "b": box_mask((4, 5), 0, 1, 0, 3)},
                          {"a": truth, "b": np.zeros((4, 5), bool)})
    assert scores["P"] == pytest.approx((0.6 + 0.85) / 2) and scores["J"] == pytest.approx(0.2)
    assert scores["images"] == 2 and scores["skipped_j"] == 1
    assert scores["per_image"]["b"] == {"P": pytest.approx(0.85), "J": None}
    with pytest.raises(ValueError, match="no prediction for 'b'"):
        class_scores({"a": truth}, {"a": truth, "b": truth})


# -- folder layouts -------------------------------------------------------------------------------

def make_internet_class(folder: Path) -> dict[str, np.ndarray]:
    """Airplane-like class folder: a.jpg (0/255 mask), b.jpg (0/1 mask), c.png (no mask), a hidden
    file and a non-image file; returns the true masks by stem."""
    rng = np.random.default_rng(0)
    truths = {"a": box_mask((40, 50), 5, 20, 10, 30), "b": box_mask((30, 40), 0, 10, 0, 40)}
    for stem, truth in truths.items():
        image = rng.integers(0, 255, truth.shape + (3,), dtype=np.uint8)
        assert cv2.imwrite(str(write_png(folder / f"{stem}.png", image).with_suffix(".jpg")), image)
        (folder / f"{stem}.png").unlink()
    write_png(folder / "c.png", rng.integers(0, 255, (20, 20, 3), dtype=np.uint8))
    write_png(folder / "GroundTruth" / "a.png", truths["a"].astype(np.uint8) * 255)
    write_png(folder / "GroundTruth" / "b.png", truths["b"].astype(np.uint8))  # 0/1
    (folder / ".hidden.jpg").write_bytes(b"not an image")
    (folder / "Thumbs.db").write_bytes(b"junk")
    return truths


def test_read_internet_class_and_load_mask(tmp_path):
    truths = make_internet_class(tmp_path / "Airplane100")
    listing = read_internet_class(tmp_path / "Airplane100")
    assert [item.name for item in listing] == ["a", "b"] and len(listing) == 2
    name, image, mask = listing[0]
    assert (name, image.name, mask.name) == ("a", "a.jpg", "a.png")
    assert len(listing.skipped) == 1 and listing.skipped[0][0] == "c.png" and "no mask" in listing.skipped[0][1]
    for item in listing:
        np.testing.assert_array_equal(load_mask(item.mask), truths[item.name])
    colour = np.zeros((6, 6, 3), np.uint8)
    colour[1:3, 2:5] = (0, 0, 128)  # a colour mask: non-black is foreground
    np.testing.assert_array_equal(load_mask(write_png(tmp_path / "colour.png", colour)), box_mask((6, 6), 1, 3, 2, 5))
    from PIL import Image

    indices = box_mask((6, 6), 1, 3, 2, 5).astype(np.uint8)
    palette = Image.new("P", (6, 6))
    palette.putdata(indices.ravel().tolist())
    palette.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)
    palette.save(tmp_path / "palette.png")
    Image.fromarray(indices.astype(bool)).convert("1").save(tmp_path / "one_bit.png")
    for name in ("palette.png", "one_bit.png"):
        np.testing.assert_array_equal(load_mask(tmp_path / name), indices.astype(bool))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(BadInput, match="broken.png"):
        load_mask(tmp_path / "broken.png")
    with pytest.raises(LayoutError, match="GroundTruth"):
        read_internet_class(tmp_path / "Airplane100" / "GroundTruth")


def test_read_msrc_class(tmp_path):
    folder = tmp_path / "cow"
    for stem in ("1_1_s", "1_2_s", "1_3_s"):
        write_png(folder / f"{stem}.bmp", np.full((8, 8, 3), 50, np.uint8))
    write_png(folder / "gt" / "1_1_s_GT.png", box_mask((8, 8), 0, 4, 0, 4).astype(np.uint8) * 255)
    write_png(folder / "gt" / "1_2_s.png", box_mask((8, 8), 0, 4, 0, 4).astype(np.uint8))
    listing = read_msrc_class(folder)
    assert [(item.name, item.mask.name) for item in listing] == [("1_1_s", "1_1_s_GT.png"), ("1_2_s", "1_2_s.png")]
    assert [name for name, _ in listing.skipped] == ["1_3_s.bmp"]
    write_png(folder / "gt" / "1_2_s_GT.png", np.zeros((8, 8), np.uint8))
    with pytest.raises(LayoutError, match="two masks for image '1_2_s'"):
        read_msrc_class(folder)
    (folder / "GroundTruth").mkdir()
    with pytest.raises(LayoutError, match="one ground-truth folder"):
        read_msrc_class(folder)


def test_evaluate_folder_end_to_end(tmp_path):
    gt_root, pred_root = tmp_path / "Internet", tmp_path / "pred"
    truths = make_internet_class(gt_root / "Airplane100")
    # a: the truth shifted -> P and J by hand; b: no prediction (counts as empty); an extra file
    pred_a = box_mask((40, 50), 5, 20, 15, 35)  # 300 true pixels, 225 shared, union 375
    write_png(pred_root / "Airplane100" / "a.png", pred_a.astype(np.uint8) * 255)
    write_png(pred_root / "Airplane100" / "zzz.png", np.zeros((4, 4), np.uint8))
    # a second class where everything is right
    horse = gt_root / "Horse100"
    write_png(horse / "h.png", np.full((10, 12, 3), 9, np.uint8))
    write_png(horse / "GroundTruth" / "h.png", box_mask((10, 12), 2, 5, 2, 5).astype(np.uint8) * 255)
    write_png(pred_root / "Horse100" / "h.png", box_mask((10, 12), 2, 5, 2, 5).astype(np.uint8) * 255)

    report = evaluate_folder(pred_root, gt_root)
    airplane = report["classes"]["Airplane100"]
    p_a, j_a = (2000 - 150) / 2000, 225 / 375
    p_b = 1 - truths["b"].mean()  # empty prediction: the background is right
    assert airplane["P"] == pytest.approx((p_a + p_b) / 2) and airplane["J"] == pytest.approx((j_a + 0.0) / 2)
    assert airplane["missing"] == ["b"] and airplane["extra"] == ["zzz.png"]
    assert [entry[0] for entry in airplane["skipped"]] == ["c.png"] and airplane["images"] == 2
    assert report["classes"]["Horse100"]["P"] == 1.0 and report["classes"]["Horse100"]["J"] == 1.0
    assert report["P"] == pytest.approx(((p_a + p_b) / 2 + 1) / 2)
    assert report["J"] == pytest.approx((j_a / 2 + 1) / 2)
    assert set(evaluate_folder(pred_root, gt_root, classes=["Horse100"])["classes"]) == {"Horse100"}

    write_png(pred_root / "Horse100" / "h.png", np.zeros((20, 24), np.uint8))
    with pytest.raises(LayoutError, match=r"h\.png is 24x20 .*GroundTruth/h\.png is 12x10"):
        evaluate_folder(pred_root, gt_root)
    resized = evaluate_folder(pred_root, gt_root, resize_predictions=True)["classes"]["Horse100"]
    assert resized["resized"] == 1 and resized["J"] == 0.0
    with pytest.raises(LayoutError, match="plain name"):
        evaluate_folder(pred_root, gt_root, classes=["../Internet"])
    with pytest.raises(LayoutError, match="no ground-truth folder for class 'Car100'"):
        evaluate_folder(pred_root, gt_root, classes=["Car100"])


# -- clusters --------------------------------------------------------------------------------------

def test_kmeans_separates_blobs_deterministically():
    rng = np.random.default_rng(1)
    centres = np.array([[0.0, 0.0, 0.0], [10.0, 0.0, 0.0], [0.0, 10.0, 5.0]])
    sizes = (150, 100, 50)
    points = np.concatenate([centre + rng.normal(0, 0.5, (n, 3)) for centre, n in zip(centres, sizes)])
    order = rng.permutation(len(points))
    truth = np.repeat([0, 1, 2], sizes)[order]
    labels = kmeans(points[order], 3, seed=7)
    assert labels.dtype == np.int64 and labels.shape == (300,)
    np.testing.assert_array_equal(labels, truth)  # renumbered by decreasing size: exactly the blobs
    np.testing.assert_array_equal(kmeans(points[order], 3, seed=7), labels)
    np.testing.assert_array_equal(kmeans(points[order], 3, seed=8), labels)
    # more clusters than points: one per distinct row, identical rows together
    few = np.array([[1.0, 1.0], [0.0, 0.0], [1.0, 1.0]])
    np.testing.assert_array_equal(kmeans(few, 10), [0, 1, 0])
    with pytest.raises(ValueError, match="n_clusters"):
        kmeans(few, 0)


def test_cluster_regions_by_hand():
    grid = (4, 5)

    def cell(row, col):
        return row * grid[1] + col

    vertices = [  # (label, image, cell)
        (0, 0, cell(1, 1)), (0, 0, cell(2, 3)), (0, 2, cell(0, 0)),  # label 0: images 0 and 2, 3 vertices
        (1, 1, cell(3, 4)), (1, 1, cell(3, 3)),                        # label 1: one image only -> dropped
        (2, 0, cell(3, 0)), (2, 1, cell(0, 4)),                        # label 2: 2 vertices, 2 images
        (-1, 3, cell(0, 0)),                                           # left out
    ]
    labels, images, cells = (np.array(column) for column in zip(*vertices))
    clusters = cluster_regions(labels, images, cells, grid)
    assert [cluster.label for cluster in clusters] == [0, 2]
    first = clusters[0]
    assert first.size == 3 and first.n_images == 2
    assert first.boxes == {0: (1, 1, 3, 4), 2: (0, 0, 1, 1)} and first.counts == {0: 2, 2: 1}
    assert clusters[1].boxes == {0: (3, 0, 4, 1), 1: (0, 4, 1, 5)}
    # label 1 and 2 both have 2 vertices: the one in more images first
    assert [c.label for c in cluster_regions(labels, images, cells, grid, min_images=1)] == [0, 2, 1]
    assert [c.label for c in cluster_regions(labels, images, cells, grid, min_images=1, min_vertices=2)] == [0, 1]
    with pytest.raises(ValueError, match="vertex_cell"):
        cluster_regions(labels, images, cells + 20, grid)


def test_write_cluster_page(tmp_path):
    rng = np.random.default_rng(2)
    paths = [write_png(tmp_path / "images" / "a&b<c>.png", rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)),
             write_png(tmp_path / "images" / "tall.png", rng.integers(0, 255, (64, 32, 3), dtype=np.uint8)),
             tmp_path / "images" / "missing.jpg"]
    grid = (4, 5)
    clusters = [Cluster(0, 5, {0: (1, 1, 3, 4), 1: (0, 0, 4, 5), 2: (0, 0, 1, 1)}, {0: 3, 1: 1, 2: 1}),
                Cluster(3, 2, {0: (0, 0, 1, 1), 1: (3, 4, 4, 5)}, {0: 1, 1: 1})]
    assert crop_box((1, 1, 3, 4), (40, 50), grid) == (5, 5, 45, 35)  # cells of 10 x 10 pixels, half a cell pad
    assert thumb_size(40, 30, 20) == (20, 15)
    page = write_cluster_page(clusters, paths, tmp_path / "out", grid, thumb=20, max_crops=2)
    assert page == tmp_path / "out" / "index.html"
    text = page.read_text()
    assert "a&amp;b&lt;c&gt;.png" in text and "a&b<c>" not in text
    sources = re.findall(r'<img src="([^"]+)" width="(\d+)" height="(\d+)"', text)
    assert len(sources) == 4  # two crops per cluster (max_crops), the unreadable image not among them
    for source, width, height in sources:
        crop = cv2.imread(str(page.parent / source))
        assert crop is not None and crop.shape[:2] == (int(height), int(width))
    by_name = {source: (int(width), int(height)) for source, width, height in sources}
    assert by_name["crops/c0000_i000000.jpg"] == (20, 15)  # 40 x 30 pixel crop, longer side 20
    x0, y0, x1, y1 = crop_box((0, 0, 4, 5), (64, 32), grid)
    assert (x0, y0, x1, y1) == (0, 0, 32, 64) and by_name["crops/c0000_i000001.jpg"] == (10, 20)
    assert "label 0: 5 vertices in 3 images, 2 shown" in text
    page = write_cluster_page(clusters[:1], paths, tmp_path / "out2", grid, thumb=20)
    assert "missing.jpg: cannot read (file not found)" in page.read_text()
