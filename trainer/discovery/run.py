"""``trainer discover``: the whole chain on a folder of images, each stage timed and resumable.

1. **images**: the folder listed and checked (unreadable files set aside and named).
2. **features**: the backbone's features of every image at ``size`` x ``size`` from the feature
   cache (:mod:`trainer.retrieval.cache`; computed once, reused by later runs).
3. **first stage**: each image's ``shortlist`` nearest images by a global descriptor (the mean of
   its normalised features, cosine), computed in blocks (N^2 dot products of 1024 numbers: seconds
   at 10k images; the only quadratic step, and a cheap one).
4. **pairs**: the network on every short-listed pair, both directions in one pass, with the Eq. 3
   score of each direction; each image keeps its ``k`` best partners by that score (the paper: 5);
   then the pairs that close the triangles among each image's partners are predicted too, so the
   3-cycles of Eq. 4 exist (at most N k (k - 1) / 2 of them). Saved as they are made
   (:class:`trainer.discovery.pairs.PairStore`): an interrupted run resumes there.
5. **graph**: the sparse correspondence graph of Eq. 4 over the kept pairs
   (:func:`trainer.discovery.graph.build_graph`).
6. **eigenvectors**: the leading eigenvector(s), sparse (:func:`trainer.discovery.spectral.leading_eigenvectors`).
7. **coseg**: the first eigenvector summed per image and cell is a foreground potential that seeds
   GrabCut: ``masks/<name>.png`` (0/255, each image's own size) and ``potentials.npy``. Or
   **clusters**: ``n_eigenvectors`` eigenvectors, K-means on the vertices, clusters of image
   regions in ``clusters/index.html``.

``report.json`` holds every stage's time, peak memory and counts.
"""
from __future__ import annotations

import dataclasses
import json
import resource
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
from tqdm import tqdm

from datagen.format.atomic import atomic_write_bytes
from datagen.format.draw import fit_width, overlay_mask, tile_sheet
from datagen.format.imageio import load_rgb

from ..retrieval.images import inspect_images, list_images
from .clusters import cluster_regions, kmeans, write_cluster_page
from .coseg import CosegOptions
from .filters import border_pairs, duplicate_pairs
from .graph import GraphParams, build_graph
from .pairs import (
    PairStore,
    Predictions,
    network_runner,
    partner_pairs,
    plan_identity,
    top_neighbours,
    triangle_pairs,
    unordered,
)
from .spectral import image_potentials, leading_eigenvectors, vertex_embedding

MODES = ("coseg", "clusters")


@dataclass(frozen=True)
class DiscoverOptions:
    """Settings of a discovery run; defaults are the paper's and the authors' (``evalInt/``)."""

    mode: str = "coseg"
    size: int = 480
    """Images are seen at size x size (the authors' 480p for the Internet dataset)."""
    k: int = 5
    """Partners kept per image (the paper: the five most similar, by Eq. 3)."""
    shortlist: int = 20
    """Candidates per image from the first stage, scored by the network to choose the k."""
    close_triangles: bool = True
    graph: GraphParams = field(default_factory=GraphParams)
    coseg: CosegOptions = field(default_factory=CosegOptions)
    n_eigenvectors: int = 100
    """Clusters mode: eigenvectors embedding the vertices (the paper: 100)."""
    n_clusters: int = 500
    """Clusters mode: K-means clusters (the paper: 500 on Brueghel)."""
    min_images: int = 2
    """Clusters mode: a cluster must span this many images to be shown."""
    filter_pairs: bool | None = None
    """Leave duplicates and pairs matching on their borders out of the graph
    (:mod:`trainer.discovery.filters`); None: in clusters mode only (the paper, on Brueghel)."""
    duplicate_mask: float = 0.9
    """A pair is a duplicate when its mean predicted mask is at least this in both images."""
    border_share: float = 0.5
    """A pair matches on its borders when this share of its confident cells is on the outer ring."""
    batch: int = 16
    cache_dir: Path = Path("~/.cache/segswap/features")
    progress: bool = True

    def validate(self) -> DiscoverOptions:
        checks = [
            (self.mode in MODES, f"--mode must be one of {', '.join(MODES)}, got {self.mode!r}"),
            (self.size >= 16 and self.size % 16 == 0, f"--size must be a multiple of 16, got {self.size}"),
            (self.k >= 1, f"--k must be at least 1, got {self.k}"),
            (self.shortlist == 0 or self.shortlist >= self.k,
             f"--shortlist must be 0 (the first stage gives the k) or at least --k, got {self.shortlist}"),
            (self.n_eigenvectors >= 1, f"--eigenvectors must be at least 1, got {self.n_eigenvectors}"),
            (self.n_clusters >= 1, f"--clusters must be at least 1, got {self.n_clusters}"),
            (self.batch >= 1, f"--batch must be at least 1, got {self.batch}"),
            (0 < self.duplicate_mask <= 1, f"--duplicate-mask must be in (0, 1], got {self.duplicate_mask}"),
            (0 < self.border_share <= 1, f"--border-share must be in (0, 1], got {self.border_share}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        return self


class StageClock:
    """Time, peak memory and counts of each stage, for report.json and the messages."""

    def __init__(self, say: Callable[[str], None] | None = None):
        self.stages: dict[str, dict] = {}
        self.say = say or (lambda text: print(text, file=sys.stderr))

    def run(self, name: str, work: Callable[[], object], counts: Callable[[object], dict] | None = None):
        started = time.perf_counter()
        result = work()
        seconds = time.perf_counter() - started
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB (Linux: kB)
        record = {"seconds": round(seconds, 3), "peak_rss_mib": round(peak, 1), **(counts(result) if counts else {})}
        self.stages[name] = record
        extra = ", ".join(f"{k} {v}" for k, v in record.items() if k not in ("seconds", "peak_rss_mib"))
        self.say(f"{name}: {seconds:.1f} s, peak memory {peak:.0f} MiB" + (f"; {extra}" if extra else ""))
        return result


# -- the chain after the network -----------------------------------------------------------------

def graph_pairs(neighbours: np.ndarray, predictions: Predictions, close_triangles: bool) -> np.ndarray:
    """Indices into ``predictions`` of the pairs the graph uses: each image with its kept partners,
    and (``close_triangles``) the pairs between two partners of one image."""
    wanted = [(i, int(j)) for i, row in enumerate(neighbours) for j in row if j >= 0]
    if close_triangles:
        wanted += partner_pairs(neighbours)
    keys = {tuple(pair) for pair in unordered(wanted).tolist()}
    return np.array([index for index, pair in enumerate(predictions.pairs.tolist()) if tuple(pair) in keys],
                    dtype=np.int64)


def discover_from_predictions(image_paths: Sequence[Path], predictions: Predictions, neighbours: np.ndarray,
                              out_dir, options: DiscoverOptions, clock: StageClock | None = None) -> dict:
    """Graph, eigenvectors and coseg masks or clusters from predictions (the network's, or any
    that keep its contract: :class:`trainer.discovery.pairs.Predictions`). ``neighbours`` (N, k)
    the partners kept per image (-1: none). Writes into ``out_dir``; returns the report's part."""
    out = Path(out_dir)
    clock = clock or StageClock()
    n_images = len(image_paths)
    grid = predictions.out_ij.shape[2:]
    keep = graph_pairs(neighbours, predictions, options.close_triangles)
    filtered = {"duplicates": 0, "border_pairs": 0}
    if options.filter_pairs if options.filter_pairs is not None else options.mode == "clusters":
        duplicates = duplicate_pairs(predictions.out_ij[keep], predictions.out_ji[keep], options.duplicate_mask)
        borders = border_pairs(predictions.out_ij[keep], predictions.out_ji[keep], options.graph.mask_threshold,
                               options.border_share) & ~duplicates
        filtered = {"duplicates": int(duplicates.sum()), "border_pairs": int(borders.sum()),
                    "left_out": [predictions.pairs[i].tolist() for i in keep[duplicates | borders]]}
        keep = keep[~(duplicates | borders)]
    graph = clock.run("graph", lambda: build_graph(predictions.pairs[keep], predictions.out_ij[keep],
                                                   predictions.out_ji[keep], n_images, options.graph),
                      lambda g: {"vertices": g.stats.n_vertices, "edges": g.stats.n_edges,
                                 "pairs": int(len(keep)), "triplets_closed": g.stats.n_triplets_closed})
    n_vectors = 1 if options.mode == "coseg" else options.n_eigenvectors
    values, vectors = clock.run("eigenvectors", lambda: leading_eigenvectors(graph.weights, n_vectors),
                                lambda r: {"eigenvectors": int(r[1].shape[1]) if r[1].ndim == 2 else 0})
    report = {"graph": graph.stats.as_dict(), "eigenvalues": [float(v) for v in values[:10]],
              "pairs_left_out": filtered}
    if options.mode == "coseg":
        vector = vectors[:, 0] if vectors.shape[1] else np.zeros(len(graph.vertices))
        potentials = image_potentials(graph, vector, n_images, grid)
        out.mkdir(parents=True, exist_ok=True)
        np.save(out / "potentials.npy", potentials.astype(np.float32), allow_pickle=False)
        report["coseg"] = clock.run("coseg", lambda: _write_masks(image_paths, potentials, out / "masks",
                                                                   options.coseg, options.progress),
                                    lambda r: {"images": r["images"], "grabcut_fallbacks": len(r["fallbacks"])})
    else:
        def cluster():
            embedding = vertex_embedding(vectors, values)
            labels = kmeans(embedding, min(options.n_clusters, max(len(embedding), 1)))
            clusters = cluster_regions(labels, graph.vertices.image, graph.vertices.cell, grid,
                                       min_images=options.min_images)
            page = write_cluster_page(clusters, list(image_paths), out / "clusters", grid)
            return {"clusters": len(clusters), "page": str(page),
                    "members": [{"label": int(c.label), "images": sorted(int(i) for i in c.boxes)} for c in clusters]}

        report["clusters"] = clock.run("clusters", cluster, lambda r: {"clusters": r["clusters"]}) \
            if len(graph.vertices) else {"clusters": 0, "members": []}
    return report


def _write_masks(image_paths: Sequence[Path], potentials: np.ndarray, folder: Path, options: CosegOptions,
                 progress: bool) -> dict:
    """GrabCut every image from its potential; ``folder/<stem>.png`` 0/255 at the image's size, and
    ``overview.jpg`` beside the folder: the first images with their masks tinted."""
    folder.mkdir(parents=True, exist_ok=True)
    fallbacks, thumbnails = {}, []
    for path, potential in tqdm(list(zip(image_paths, potentials)), desc="coseg", unit="img",
                                disable=not progress, file=sys.stderr, dynamic_ncols=True):
        image = load_rgb(path)
        result = options.run(image, potential)
        if not result.grabcut:
            fallbacks[Path(path).name] = result.note
        ok, data = cv2.imencode(".png", result.mask.astype(np.uint8) * 255)
        if not ok:
            raise OSError(f"{folder}: cannot encode the mask of {path}")
        atomic_write_bytes(folder / f"{Path(path).stem}.png", data.tobytes())
        if len(thumbnails) < OVERVIEW_IMAGES:
            thumbnails.append(fit_width(overlay_mask(image, result.mask.astype(np.uint8), fill=True), OVERVIEW_WIDTH))
    if thumbnails:
        write_overview(folder.parent / "overview.jpg", thumbnails)
    return {"images": len(image_paths), "fallbacks": fallbacks, "folder": str(folder)}


OVERVIEW_IMAGES = 60
"""Images drawn on ``overview.jpg`` (the first ones, in the folder's order)."""
OVERVIEW_WIDTH = 192


def write_overview(path: Path, thumbnails: Sequence[np.ndarray], columns: int = 6) -> None:
    """A contact sheet of (H, W, 3) uint8 RGB thumbnails of one width, ``columns`` a row, on white."""
    sheet = tile_sheet(list(thumbnails), columns, OVERVIEW_WIDTH)
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 88])
    if not ok:
        raise OSError(f"{path}: cannot encode the overview")
    atomic_write_bytes(path, data.tobytes())


# -- the network's part ---------------------------------------------------------------------------

def first_stage(descriptors: torch.Tensor, count: int, block: int = 4096) -> np.ndarray:
    """(N, count) int: each image's ``count`` nearest other images by cosine of its (N, C) unit
    descriptor, best first (-1 where there are fewer); computed ``block`` rows at a time."""
    n = len(descriptors)
    count = min(count, max(n - 1, 0))
    nearest = np.full((n, count), -1, np.int64)
    if count == 0:
        return nearest
    for start in range(0, n, block):
        similarity = descriptors[start: start + block] @ descriptors.T
        rows = torch.arange(similarity.shape[0])
        similarity[rows, rows + start] = -float("inf")
        nearest[start: start + block] = torch.topk(similarity, count, dim=1).indices.numpy()
    return nearest


def discover(checkpoint, images_dir, out_dir, options: DiscoverOptions | None = None, device: str = "auto") -> dict:
    """The whole chain (module docstring) on the images of ``images_dir``; writes ``out_dir`` and
    returns report.json's contents."""
    from ..inference import load_for_inference
    from ..retrieval.engine import Resolution
    from ..retrieval.rank import database_cache, global_descriptors

    options = (options or DiscoverOptions()).validate()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    clock = StageClock()
    started = time.perf_counter()
    names = list_images(images_dir)
    records, broken = clock.run("images", lambda: inspect_images(images_dir, names),
                                lambda r: {"images": len(r[0]), "set_aside": len(r[1])})
    if len(records) < 2:
        raise ValueError(f"{images_dir}: discovery needs at least 2 readable images, found {len(records)}")
    loaded = load_for_inference(checkpoint, device)
    resolution = Resolution(options.size, options.size)
    cache, cache_stats = clock.run("features", lambda: database_cache(
        loaded.backbone, records, resolution, options.cache_dir, options.batch, options.progress),
        lambda r: {k: r[1][k] for k in ("computed", "reused", "copied")})
    grid = resolution.grid
    first = options.shortlist or options.k
    nearest = clock.run("first stage", lambda: first_stage(global_descriptors(cache, range(len(records))), first),
                        lambda r: {"candidates_per_image": int(r.shape[1])})
    identity = plan_identity(images=[r.sha256 for r in records], size=options.size,
                             network=_network_identity(loaded), score="eq3")
    store = PairStore(out / "pairs")
    run = network_runner(loaded.model, lambda rows: torch.from_numpy(cache.get(rows)), grid, options.batch)
    candidates = unordered([(i, int(j)) for i, row in enumerate(nearest) for j in row if j >= 0])
    predicted, shortlist_stats = clock.run(
        "pairs", lambda: store.predict("shortlist", candidates, identity, grid, run, progress=options.progress),
        lambda r: r[1])
    neighbours = top_neighbours(len(records), predicted, options.k)
    parts = [predicted]
    if options.close_triangles:
        missing = triangle_pairs(neighbours, predicted.pairs)
        closing, _ = clock.run("triangle pairs", lambda: store.predict("triangles", missing, identity, grid, run,
                                                                          progress=options.progress), lambda r: r[1])
        parts.append(closing)
    predictions = Predictions.concatenate(parts, grid)
    report = discover_from_predictions([r.path for r in records], predictions, neighbours, out, options, clock)
    summary = {"checkpoint": str(checkpoint), "images": [r.name for r in records], "set_aside": broken,
               "options": _plain(dataclasses.asdict(options)), "features": cache_stats, "pairs": shortlist_stats,
               "neighbours": neighbours.tolist(), "stages": clock.stages, "seconds": time.perf_counter() - started,
               **report}
    atomic_write_bytes(out / "report.json", (json.dumps(summary, indent=2, default=str) + "\n").encode())
    return summary


def _network_identity(loaded) -> dict:
    """What the predictions depend on: the network's and the backbone's weights."""
    from ..retrieval.cache import backbone_digest

    return {"model": backbone_digest(loaded.model), "backbone": backbone_digest(loaded.backbone),
            "config": loaded.config.to_dict()}


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value if isinstance(value, (int, float, str, bool, type(None))) else str(value)
