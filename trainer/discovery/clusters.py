"""Clusters of repeated regions: K-means on the graph's leading eigenvectors, one box per image and
cluster, and an HTML page of the boxes' crops (paper section 5, discovery on Brueghel).

Each vertex of the correspondence graph is seen here through one image and one cell of it
(``vertex_image``, ``vertex_cell``; a cell is ``row * w + col`` of the (h, w) grid, see
:mod:`trainer.discovery`); a correspondence between two images is passed as two such vertices
if both ends should count. The embedding of a vertex is its row of the eigenvector matrix.

Filtering is kept simple: a cluster must hold at least ``min_vertices`` vertices in an image for
that image to count, and must count in at least ``min_images`` images. Near-duplicate images (the
same picture twice in a collection, which repeats every region trivially) are not detected here:
removing them before building the graph is the caller's business.
"""
from __future__ import annotations

import dataclasses
import html
import os
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
from scipy.spatial.distance import cdist

from datagen.format.imageio import BadInput, load_rgb

Box = tuple[int, int, int, int]
"""(top, left, bottom, right) in cells of the grid; bottom and right excluded."""
CROPS_DIR = "crops"
PAGE_NAME = "index.html"
JPEG_QUALITY = 90
_CHUNK_ENTRIES = 1 << 22
"""Vertices x centres distances computed at once (float64: 32 MiB)."""


# -- k-means ------------------------------------------------------------------------------------

def _check_embedding(embedding) -> np.ndarray:
    points = np.asarray(embedding)
    if points.ndim == 1:
        points = points[:, None]
    if points.ndim != 2 or points.shape[0] == 0 or points.shape[1] == 0:
        raise ValueError(f"embedding must be a non-empty (V, d) array, got shape {np.shape(embedding)}")
    if not np.issubdtype(points.dtype, np.number) or np.issubdtype(points.dtype, np.complexfloating):
        raise ValueError(f"embedding must hold real numbers, got {points.dtype}")
    points = points.astype(np.float64)
    if not np.isfinite(points).all():
        raise ValueError("embedding holds NaN or infinite values")
    return points


def _nearest(points: np.ndarray, centres: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(index of the nearest centre, squared distance to it) of each point, in chunks of rows."""
    labels = np.empty(len(points), np.int64)
    distances = np.empty(len(points), np.float64)
    step = max(1, _CHUNK_ENTRIES // max(1, len(centres)))
    for start in range(0, len(points), step):
        squared = cdist(points[start: start + step], centres, "sqeuclidean")
        nearest = np.argmin(squared, axis=1)
        labels[start: start + step] = nearest
        distances[start: start + step] = squared[np.arange(len(squared)), nearest]
    return labels, distances


def _plus_plus(points: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k initial centres by greedy k-means++: each next centre is the best (lowest sum of squared
    distances to the nearest centre) of ``2 + log(k)`` candidates drawn with probability
    proportional to the squared distance to the nearest centre so far (scikit-learn's variant)."""
    trials = 2 + int(np.log(k))
    centres = np.empty((k, points.shape[1]), np.float64)
    centres[0] = points[rng.integers(len(points))]
    closest = ((points - centres[0]) ** 2).sum(axis=1)
    for i in range(1, k):
        total = closest.sum()
        if total <= 0:  # every point is already a centre: any point will do
            candidates = rng.integers(len(points), size=trials)
        else:
            candidates = np.searchsorted(np.cumsum(closest), rng.random(trials) * total, side="right")
            candidates = np.minimum(candidates, len(points) - 1)
        best, best_total, best_closest = None, np.inf, None
        for candidate in candidates:
            updated = np.minimum(closest, ((points - points[candidate]) ** 2).sum(axis=1))
            if updated.sum() < best_total:
                best, best_total, best_closest = candidate, updated.sum(), updated
        centres[i] = points[best]
        closest = best_closest
    return centres


def _lloyd(points: np.ndarray, centres: np.ndarray, iterations: int, tolerance: float) -> tuple[np.ndarray, float]:
    """Lloyd steps from ``centres`` until the labels stop changing, the centres move less than
    ``tolerance`` (summed squared shift) or ``iterations`` steps; (labels, inertia)."""
    labels, distances = _nearest(points, centres)
    for _ in range(iterations):
        counts = np.bincount(labels, minlength=len(centres))
        sums = np.stack([np.bincount(labels, weights=points[:, j], minlength=len(centres))
                         for j in range(points.shape[1])], axis=1)
        nonempty = counts > 0
        moved = centres.copy()
        moved[nonempty] = sums[nonempty] / counts[nonempty, None]
        for empty in np.flatnonzero(~nonempty):  # re-seed an empty cluster at the worst-served point
            far = int(np.argmax(distances))
            moved[empty] = points[far]
            distances[far] = 0.0
        shift = float(((moved - centres) ** 2).sum())
        centres = moved
        new_labels, distances = _nearest(points, centres)
        unchanged = np.array_equal(new_labels, labels)
        labels = new_labels
        if (unchanged or shift <= tolerance) and nonempty.all():
            break
    return labels, float(distances.sum())


def _canonical(labels: np.ndarray) -> np.ndarray:
    """Labels renumbered 0, 1, ... by decreasing cluster size, ties by first vertex."""
    values, first, counts = np.unique(labels, return_index=True, return_counts=True)
    order = np.lexsort((first, -counts))
    renumber = np.empty(values.max() + 1 if len(values) else 0, np.int64)
    renumber[values[order]] = np.arange(len(values))
    return renumber[labels]


def kmeans(embedding, n_clusters: int, seed: int = 0, iterations: int = 100, n_init: int = 1,
           tol: float = 1e-4) -> np.ndarray:
    """(V,) int64 cluster labels of the rows of ``embedding`` ((V, d) float), by k-means.

    k-means++ initialisation drawn from ``numpy.random.default_rng(seed)``, then Lloyd steps
    (an emptied cluster is re-seeded at the point farthest from its centre) until the labels stop
    changing, the centres move less than ``tol`` times the data's mean variance per dimension
    (summed squared shift, as scikit-learn's ``tol``), or ``iterations`` steps; the best of
    ``n_init`` such runs (lowest sum of squared distances) is kept. The same
    inputs give the same labels. Labels are renumbered by decreasing cluster size (ties: the
    cluster of the lower first vertex first), so label 0 is the largest cluster.

    With ``n_clusters`` at least the number of distinct rows, each distinct row is its own
    cluster (identical rows share a label): fewer than ``n_clusters`` labels come back.
    """
    points = _check_embedding(embedding)
    if isinstance(n_clusters, bool) or not isinstance(n_clusters, (int, np.integer)) or n_clusters < 1:
        raise ValueError(f"n_clusters must be an integer >= 1, got {n_clusters!r}")
    if iterations < 0 or n_init < 1 or not tol >= 0:
        raise ValueError(f"iterations and tol must be >= 0 and n_init >= 1, got {iterations}, {tol} and {n_init}")
    distinct, inverse = np.unique(points, axis=0, return_inverse=True)
    if n_clusters >= len(distinct):
        return _canonical(inverse.reshape(-1))
    rng = np.random.default_rng(seed)
    tolerance = tol * float(points.var(axis=0).mean())
    best_labels, best_inertia = None, np.inf
    for _ in range(n_init):
        labels, inertia = _lloyd(points, _plus_plus(points, int(n_clusters), rng), iterations, tolerance)
        if inertia < best_inertia:
            best_labels, best_inertia = labels, inertia
    return _canonical(best_labels)


# -- regions ------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Cluster:
    """One cluster of vertices: ``label`` (of :func:`kmeans`), ``size`` (its vertices in the
    images it counts in), and per image index it counts in, ``boxes`` (the :data:`Box` in cells
    around its vertices there) and ``counts`` (its vertices there)."""

    label: int
    size: int
    boxes: dict[int, Box]
    counts: dict[int, int]

    @property
    def n_images(self) -> int:
        return len(self.boxes)

    def images_by_count(self) -> list[int]:
        """Its image indices, most vertices first (ties: lower index first)."""
        return sorted(self.boxes, key=lambda image: (-self.counts[image], image))


def _check_grid(grid) -> tuple[int, int]:
    try:
        height, width = (int(side) for side in grid)
    except (TypeError, ValueError):
        raise ValueError(f"grid must be (h, w), got {grid!r}") from None
    if height < 1 or width < 1:
        raise ValueError(f"grid must be (h, w) with positive sides, got {grid!r}")
    return height, width


def _integer_vector(values, name: str, length: int | None = None) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1 or (array.size and not np.issubdtype(array.dtype, np.integer)):
        raise ValueError(f"{name} must be a (V,) integer array, got {array.dtype} {array.shape}")
    if length is not None and len(array) != length:
        raise ValueError(f"{name} has {len(array)} entries, labels {length}")
    return array.astype(np.int64)


def cluster_regions(labels, vertex_image, vertex_cell, grid, min_images: int = 2,
                    min_vertices: int = 1) -> list[Cluster]:
    """The clusters of ``labels`` ((V,) int; negative: vertex left out) as regions of images.

    For each cluster and each image holding at least ``min_vertices`` of its vertices, the box
    (in cells of the (h, w) ``grid``) around those vertices' cells; clusters counting in fewer
    than ``min_images`` images are dropped. Sorted by size (vertices in the images that count),
    largest first; ties by number of images, then label.
    """
    labels = _integer_vector(labels, "labels")
    images = _integer_vector(vertex_image, "vertex_image", len(labels))
    cells = _integer_vector(vertex_cell, "vertex_cell", len(labels))
    height, width = _check_grid(grid)
    if len(images) and images.min() < 0:
        raise ValueError(f"vertex_image holds a negative index ({images.min()})")
    if len(cells) and (cells.min() < 0 or cells.max() >= height * width):
        raise ValueError(f"vertex_cell must be in [0, {height * width}) for a {height}x{width} grid, "
                         f"got [{cells.min()}, {cells.max()}]")
    keep = labels >= 0
    labels, images, cells = labels[keep], images[keep], cells[keep]
    rows, cols = np.divmod(cells, width)
    clusters = []
    order = np.lexsort((images, labels))
    labels, images, rows, cols = labels[order], images[order], rows[order], cols[order]
    # one group per (label, image) run in the sorted order
    starts = np.flatnonzero(np.r_[True, (labels[1:] != labels[:-1]) | (images[1:] != images[:-1])])
    ends = np.r_[starts[1:], len(labels)]
    by_label: dict[int, tuple[dict[int, Box], dict[int, int]]] = {}
    for start, end in zip(starts, ends):
        if end - start < min_vertices:
            continue
        boxes, counts = by_label.setdefault(int(labels[start]), ({}, {}))
        image = int(images[start])
        boxes[image] = (int(rows[start:end].min()), int(cols[start:end].min()),
                        int(rows[start:end].max()) + 1, int(cols[start:end].max()) + 1)
        counts[image] = int(end - start)
    for label, (boxes, counts) in by_label.items():
        if len(boxes) >= min_images:
            clusters.append(Cluster(label, sum(counts.values()), boxes, counts))
    clusters.sort(key=lambda cluster: (-cluster.size, -cluster.n_images, cluster.label))
    return clusters


# -- the page -----------------------------------------------------------------------------------

def crop_box(box: Box, image_size: tuple[int, int], grid, pad_cells: float = 0.5) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) pixels of an image of ``image_size`` (height, width): the cell ``box``
    grown by ``pad_cells`` cells on each side, scaled from the grid to the image (outwards to
    whole pixels) and clipped to it; x1, y1 excluded."""
    grid_h, grid_w = _check_grid(grid)
    image_h, image_w = image_size
    top, left, bottom, right = box
    y0 = max(0, int(np.floor((top - pad_cells) * image_h / grid_h)))
    x0 = max(0, int(np.floor((left - pad_cells) * image_w / grid_w)))
    y1 = min(image_h, int(np.ceil((bottom + pad_cells) * image_h / grid_h)))
    x1 = min(image_w, int(np.ceil((right + pad_cells) * image_w / grid_w)))
    return x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)


def thumb_size(width: int, height: int, thumb: int) -> tuple[int, int]:
    """(width, height) of a crop scaled so its longer side is ``thumb`` pixels."""
    scale = thumb / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _write_jpeg(path: Path, rgb: np.ndarray) -> None:
    ok, data = cv2.imencode(".jpg", np.ascontiguousarray(rgb[:, :, ::-1]), [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise OSError(f"{path}: cannot encode JPEG")
    path.write_bytes(data.tobytes())


def write_cluster_page(clusters: Sequence[Cluster], image_paths: Sequence, out_dir, grid, thumb: int = 160,
                       max_crops: int = 24, pad_cells: float = 0.5, title: str = "Discovered clusters") -> Path:
    """Write ``out_dir/index.html``: one section per cluster (in the given order) with a row of
    JPEG crops of its regions (at most ``max_crops``, images holding most of its vertices first),
    written to ``out_dir/crops/c<rank>_i<image>.jpg``. A crop is :func:`crop_box` of the region in
    the original image ``image_paths[image]``, scaled so its longer side is ``thumb`` pixels. An
    image that cannot be read is named on the page instead of its crop. Plain HTML, names
    escaped, links relative (the folder can be moved). Returns the page's path. Crops of earlier
    runs in ``crops/`` are left where they are."""
    if thumb < 1 or max_crops < 1:
        raise ValueError(f"thumb and max_crops must be >= 1, got {thumb} and {max_crops}")
    _check_grid(grid)
    paths = [Path(path) for path in image_paths]
    out = Path(out_dir)
    (out / CROPS_DIR).mkdir(parents=True, exist_ok=True)
    shown: list[list[int]] = []
    jobs: dict[int, list[tuple[int, Box]]] = {}
    for rank, cluster in enumerate(clusters):
        chosen = cluster.images_by_count()[:max_crops]
        for image in chosen:
            if not 0 <= image < len(paths):
                raise ValueError(f"cluster {cluster.label} has image index {image}, but {len(paths)} image paths")
            jobs.setdefault(image, []).append((rank, cluster.boxes[image]))
        shown.append(chosen)
    figures: dict[tuple[int, int], str] = {}
    for image, wanted in sorted(jobs.items()):  # each image is read once
        name = html.escape(paths[image].name)
        try:
            rgb = load_rgb(paths[image], min_side=1)
        except BadInput as error:
            for rank, _ in wanted:
                figures[rank, image] = (f'<figure class="bad"><figcaption>{name}: cannot read '
                                        f"({html.escape(error.reason)})</figcaption></figure>")
            continue
        for rank, box in wanted:
            x0, y0, x1, y1 = crop_box(box, rgb.shape[:2], grid, pad_cells)
            crop = rgb[y0:y1, x0:x1]
            width, height = thumb_size(x1 - x0, y1 - y0, thumb)
            shrink = width < x1 - x0
            crop = cv2.resize(crop, (width, height), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
            file_name = f"c{rank:04d}_i{image:06d}.jpg"
            _write_jpeg(out / CROPS_DIR / file_name, crop)
            figures[rank, image] = (f'<figure><img src="{CROPS_DIR}/{file_name}" width="{width}" height="{height}" '
                                    f'alt="{name}" title="{name} cells {box}"><figcaption>{name}</figcaption></figure>')
    sections = []
    for rank, (cluster, chosen) in enumerate(zip(clusters, shown)):
        more = f", {len(chosen)} shown" if len(chosen) < cluster.n_images else ""
        sections.append(f'<section><h2>Cluster {rank + 1} <small>(label {cluster.label}: {cluster.size} vertices '
                        f"in {cluster.n_images} images{more})</small></h2>\n<div class=\"row\">"
                        + "".join(figures[rank, image] for image in chosen) + "</div></section>")
    page = "\n".join([
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;margin:1em}.row{display:flex;flex-wrap:wrap;gap:6px}"
        "figure{margin:0;text-align:center;font-size:11px;max-width:" + str(thumb) + "px;overflow-wrap:anywhere}"
        "figure.bad{color:#a00}h2 small{font-weight:normal;color:#555}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p>{len(clusters)} clusters; crops padded by {pad_cells:g} cell, longer side {thumb} px.</p>",
        *sections, "</body></html>", ""])
    target = out / PAGE_NAME
    temporary = out / f".{PAGE_NAME}.{os.getpid()}.tmp"
    temporary.write_text(page, encoding="utf-8")
    os.replace(temporary, target)
    return target
