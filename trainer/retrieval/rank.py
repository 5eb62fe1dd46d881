"""``trainer retrieve``: queries scored against a database with a trained network, ranked.

The run, in order:

1. The database folder is listed and every file read once (sha256, header size); unreadable
   files are set aside and recorded (:mod:`trainer.retrieval.images`).
2. Backbone features of the database images the queries need (all of them, or the union of the
   short-lists) come from the feature cache, computed for the images it lacks
   (:mod:`trainer.retrieval.cache`: float16, memory-mapped, resumable, keyed by the backbone's
   weights, the resolution and each file's bytes).
3. Each query is prepared (:func:`trainer.retrieval.engine.query_view`), its candidates chosen
   (every database image but the query's own file, its short-list, or the top K of a first stage
   of global descriptors: the mean of the backbone's normalised features, cosine), and the pairs
   scored in batches (:class:`trainer.retrieval.engine.PairScorer`, GPU when there is one).
4. ``ranking.parquet`` (query, candidate, score, rank from 1; best first, ties by candidate
   name), ``run.json`` (what was run, on what, counts and speeds), and on request
   ``pictures/``: each query beside its best matches under heat maps of the predicted masks.
"""
from __future__ import annotations

import csv
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from tqdm import tqdm

from datagen.format.atomic import atomic_write, atomic_write_bytes
from datagen.format.imageio import load_rgb

from ..backbone import features
from .cache import FeatureCache, cache_key, fill
from .engine import PairScorer, Resolution, database_view, query_view, region_mask
from .images import ImageRecord, inspect_images, list_images, safe_relative
from .pictures import picture_name, write_query_picture

RANKING_SCHEMA = pa.schema([("query", pa.string()), ("candidate", pa.string()), ("score", pa.float32()),
                            ("rank", pa.int32())])
DEFAULT_CACHE = Path("~/.cache/segswap/features").expanduser()


@dataclass(frozen=True)
class Query:
    """One query: ``name`` (its id in the ranking), ``image`` (relative to the query folder) and
    ``box`` [x1, y1, x2, y2] in that image's pixels, or None for the whole image."""

    name: str
    image: str
    box: tuple[float, float, float, float] | None = None


@dataclass
class RetrieveOptions:
    """How queries are scored; the defaults are ``trainer retrieve``'s."""

    resolution: Resolution = field(default_factory=lambda: Resolution(640, 640))
    box_side: int | None = None
    """With a box: rescale the query so the box's longer side is this many pixels (the authors'
    Brueghel protocol: 64); None: the query image is prepared like a database image."""
    score: str = "eq3"
    batch: int = 32
    candidates: str = "all"
    """'all' (every database image but the query's own file) or 'first-stage' (``first_stage_k``
    nearest by global descriptor); short-lists given to :func:`retrieve` win over both."""
    first_stage_k: int = 100
    keep: int | None = None
    """Rows kept per query in ranking.parquet (None: every candidate)."""
    pictures: int = 0
    """Best matches drawn per query in pictures/ (0: no pictures)."""
    cache_dir: Path = DEFAULT_CACHE
    progress: bool = True


# -- inputs ---------------------------------------------------------------------------------------

def read_queries(source, image_dir=None) -> tuple[list[Query], Path]:
    """Queries and the folder their images are in.

    ``source``: a folder (every image in it is a whole-image query), or a CSV file with a header
    ``image[,x1,y1,x2,y2][,name]`` or a JSON list of ``{"image", "box" (optional), "name"
    (optional)}``, whose images are relative to ``image_dir`` (default: the file's folder). Names
    default to the image's, with '#k' added when one image holds several queries.
    """
    source = Path(source)
    if source.is_dir():
        return [Query(name, name) for name in list_images(source)], source
    folder = Path(image_dir) if image_dir is not None else source.parent
    try:
        text = source.read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"{source}: cannot read the queries ({error})") from error
    if source.suffix.lower() == ".json":
        try:
            rows = json.loads(text)
        except ValueError as error:
            raise ValueError(f"{source}: not JSON ({error})") from error
        if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
            raise ValueError(f"{source}: expected a JSON list of objects with 'image' and optional 'box', 'name'")
        entries = [(row.get("image"), row.get("box"), row.get("name")) for row in rows]
    elif source.suffix.lower() == ".csv":
        reader = csv.DictReader(text.splitlines())
        if not reader.fieldnames or "image" not in reader.fieldnames:
            raise ValueError(f"{source}: the CSV needs a header with an 'image' column (and x1,y1,x2,y2 for boxes)")
        has_box = all(name in reader.fieldnames for name in ("x1", "y1", "x2", "y2"))
        entries = [(row["image"], [row[k] for k in ("x1", "y1", "x2", "y2")] if has_box and row.get("x1") else None,
                    row.get("name") or None) for row in reader]
    else:
        raise ValueError(f"{source}: queries must be a folder of images, a .csv or a .json file")
    queries, seen = [], {}
    for line, (image, box, name) in enumerate(entries, start=1):
        where = f"{source}, query {line}"
        if not isinstance(image, str) or not image:
            raise ValueError(f"{where}: no image name")
        image = safe_relative(image, "query image")
        if box is not None:
            try:
                box = tuple(float(v) for v in box)
            except (TypeError, ValueError):
                raise ValueError(f"{where}: box {box!r} is not four numbers") from None
            if len(box) != 4 or not (box[2] > box[0] and box[3] > box[1]):
                raise ValueError(f"{where}: box {list(box)} must be [x1, y1, x2, y2] with x2 > x1, y2 > y1")
        count = seen.get(image, 0)
        seen[image] = count + 1
        name = str(name) if name else (image if count == 0 else f"{image}#{count}")
        queries.append(Query(name, image, box))
    names = [q.name for q in queries]
    if len(set(names)) != len(names):
        raise ValueError(f"{source}: query names repeat; give each query a distinct 'name'")
    return queries, folder


# -- features -------------------------------------------------------------------------------------

def database_cache(backbone: torch.nn.Module, records: Sequence[ImageRecord], resolution: Resolution,
                   cache_dir, batch: int, progress: bool) -> tuple[FeatureCache, dict]:
    """The feature cache of ``records`` at ``resolution``, filled; with fill's counts and timing."""
    h, w = resolution.grid
    key = cache_key({}, resolution.width, resolution.height, "squash-area-or-linear", backbone=backbone)
    cache = FeatureCache.open(Path(cache_dir).expanduser(), key, [r.sha256 for r in records], (1024, h, w))

    def compute(rows: Sequence[int]) -> torch.Tensor:
        views = np.stack([database_view(load_rgb(records[row].path), resolution) for row in rows])
        return features(backbone, views).cpu()

    stats = fill(cache, compute, batch=batch, progress=progress, desc="database features")
    return cache, stats


def global_descriptors(cache: FeatureCache, rows: Sequence[int], batch: int = 64) -> torch.Tensor:
    """(N, C) float32 unit vectors: the mean of each image's normalised cell features, normalised."""
    out = []
    for start in range(0, len(rows), batch):
        chunk = torch.from_numpy(np.asarray(cache.get(list(rows[start: start + batch])), np.float32))
        out.append(F.normalize(chunk.mean(dim=(2, 3)), dim=1))
    return torch.cat(out) if out else torch.zeros(0, 1024)


# -- the run --------------------------------------------------------------------------------------

@dataclass
class QueryResult:
    """One query's candidates (names), their scores (N,) float32 and the boxes (N, 4) float32 of
    the region the network finds in each ([x1, y1, x2, y2] normalised to [0, 1] of the candidate
    image: the cells of its predicted mask above 0.5), in candidate order."""

    query: Query
    candidates: list[str]
    scores: np.ndarray
    boxes: np.ndarray


def rank_candidates(names: Sequence[str], scores: np.ndarray) -> list[int]:
    """Indices of ``names`` ordered by score, best first; equal scores by name."""
    return sorted(range(len(names)), key=lambda i: (-float(scores[i]), names[i]))


def write_ranking(path: Path, results: Sequence[QueryResult], keep: int | None) -> int:
    """ranking.parquet from ``results``; returns the number of rows."""
    columns = {"query": [], "candidate": [], "score": [], "rank": []}
    for result in results:
        order = rank_candidates(result.candidates, result.scores)[:keep]
        for rank, index in enumerate(order, start=1):
            columns["query"].append(result.query.name)
            columns["candidate"].append(result.candidates[index])
            columns["score"].append(float(result.scores[index]))
            columns["rank"].append(rank)
    table = pa.table(columns, schema=RANKING_SCHEMA)
    atomic_write(path, lambda handle: pq.write_table(table, handle))
    return table.num_rows


def retrieve(checkpoint, database_dir, queries: Sequence[Query], query_dir, out_dir,
             options: RetrieveOptions | None = None, shortlists: dict[str, list[str]] | None = None,
             device: str = "auto", on_result: Callable[[QueryResult], None] | None = None) -> dict:
    """Score and rank; writes ``out_dir``/ranking.parquet, run.json and pictures/ (see the
    module docstring). ``checkpoint``: a checkpoint file, or a network already loaded
    (:class:`trainer.loop.Inference`: a training run validating itself). Returns the contents of
    run.json."""
    from ..inference import Inference, load_for_inference

    options = options or RetrieveOptions()
    started = time.perf_counter()
    in_memory = isinstance(checkpoint, Inference)
    loaded = checkpoint if in_memory else load_for_inference(checkpoint, device)
    database_dir, query_dir, out = Path(database_dir), Path(query_dir), Path(out_dir)
    names = list_images(database_dir)
    if shortlists is not None:
        unknown = sorted({c for cands in shortlists.values() for c in cands} - set(names))
        if unknown:
            raise ValueError(f"short-list candidates not in {database_dir}: {', '.join(unknown[:5])}"
                             + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""))
        missing = [q.name for q in queries if q.name not in shortlists]
        if missing:
            raise ValueError(f"no short-list for queries {', '.join(missing[:5])}")
        needed = sorted({c for q in queries for c in shortlists[q.name]})
    else:
        needed = names
    records, broken = inspect_images(database_dir, needed)
    if not records:
        raise ValueError(f"{database_dir}: no readable database image"
                         + (f" ({len(broken)} set aside)" if broken else ""))
    row_of = {record.name: row for row, record in enumerate(records)}
    cache, cache_stats = database_cache(loaded.backbone, records, options.resolution, options.cache_dir,
                                        options.batch, options.progress)
    scorer = PairScorer(loaded.backbone, loaded.model, options.score, options.batch)
    descriptors = global_descriptors(cache, range(len(records))) \
        if shortlists is None and options.candidates == "first-stage" else None

    results, query_broken = [], {}
    total_pairs, scoring_seconds = 0, 0.0
    own = {record.path.resolve(): record.name for record in records}

    def expected_pairs(query: Query) -> int:
        if shortlists is not None:
            return sum(candidate in row_of for candidate in shortlists[query.name])
        count = len(records) - int((query_dir / query.image).resolve() in own)
        return min(count, options.first_stage_k) if descriptors is not None else count

    bar = tqdm(total=sum(expected_pairs(q) for q in queries), unit="pair", desc="scoring",
               disable=not options.progress, file=sys.stderr, dynamic_ncols=True)
    try:
        for query in queries:
            query_path = query_dir / query.image
            try:
                image = load_rgb(query_path)
                view, box = query_view(image, query.box, options.resolution, options.box_side)
            except Exception as error:  # noqa: BLE001 - one bad query is recorded, the others go on
                query_broken[query.name] = str(error)
                bar.update(expected_pairs(query))
                continue
            tick = time.perf_counter()
            query_feat = scorer.query_features(view)
            region = scorer.query_region(query_feat, region_mask(box, options.resolution))
            if shortlists is not None:
                candidates = [c for c in shortlists[query.name] if c in row_of]
            else:
                self_name = own.get(query_path.resolve())
                candidates = [r.name for r in records if r.name != self_name]
                if descriptors is not None and len(candidates) > options.first_stage_k:
                    rows = torch.tensor([row_of[c] for c in candidates])
                    query_global = F.normalize(query_feat.mean(dim=(2, 3)).cpu(), dim=1)[0]
                    similarity = descriptors[rows] @ query_global
                    keep = torch.topk(similarity, options.first_stage_k).indices.sort().values
                    candidates = [candidates[i] for i in keep.tolist()]
            rows = [row_of[c] for c in candidates]
            batches = (cache.get(rows[i: i + options.batch]) for i in range(0, len(rows), options.batch))
            scored = list(scorer.score_batches(query_feat, region, batches))
            scores = np.concatenate([s for s, _ in scored]) if scored else np.zeros(0, np.float32)
            boxes = np.concatenate([b for _, b in scored]) if scored else np.zeros((0, 4), np.float32)
            scoring_seconds += time.perf_counter() - tick
            total_pairs += len(rows)
            result = QueryResult(query, candidates, scores.astype(np.float32), boxes)
            results.append(result)
            if options.pictures:
                best = [(candidates[i], float(scores[i])) for i in rank_candidates(candidates, scores)]
                write_query_picture(out / "pictures" / picture_name(len(results) - 1, query.name), scorer,
                                    query_feat, view, region, best[: options.pictures], cache, row_of, records,
                                    options.resolution)
            if on_result is not None:
                on_result(result)
            bar.update(len(rows))
            bar.set_postfix(queries=f"{len(results) + len(query_broken)}/{len(queries)}")
    finally:
        bar.close()

    out.mkdir(parents=True, exist_ok=True)
    rows_written = write_ranking(out / "ranking.parquet", results, options.keep)
    summary = {
        "checkpoint": "(in memory)" if in_memory else str(checkpoint), "step": loaded.step,
        "backbone": loaded.backbone_record,
        "database": str(database_dir), "queries": len(queries), "queries_scored": len(results),
        "resolution": str(options.resolution), "box_side": options.box_side, "score": options.score,
        "candidates": "short-lists" if shortlists is not None else options.candidates,
        "first_stage_k": options.first_stage_k if descriptors is not None else None,
        "database_images": len(records), "set_aside": broken, "queries_set_aside": query_broken,
        "pairs_scored": total_pairs, "pairs_per_second": total_pairs / scoring_seconds if scoring_seconds else None,
        "features": cache_stats, "ranking_rows": rows_written, "seconds": time.perf_counter() - started,
        "device": str(scorer.device),
    }
    atomic_write_bytes(out / "run.json", (json.dumps(summary, indent=2, default=str) + "\n").encode())
    return summary
