"""The network's predictions for the pairs a discovery run needs, saved as they are made.

A run predicts a list of unordered image pairs (i, j), i < j, in stages (the first stage's
short-lists, then the pairs that close triangles). Each forward pass gives both directions: the
outputs for image i towards j and for j towards i, and the Eq. 3 score of each direction.

On disk, ``OUT/pairs/``:

- ``<stage>.plan.json``: what the stage predicts and with what (the pairs, the images' content
  ids, the resolution, the network's identity); a rerun whose plan differs starts the stage over.
- ``<stage>-NNNNNN.npz``: one chunk of predictions (``np.savez``, never pickles, written atomically):
  ``pairs`` (n, 2) int32, ``out_ij`` and ``out_ji`` (n, 3, h, w) float16 (x, y of the
  correspondence in the other image normalised to [0, 1], then the mask), ``scores`` (n, 2)
  float32 (Eq. 3 with i as the source, then with j). Chunk k holds the plan's pairs
  ``[k * chunk, (k + 1) * chunk)``, so an interrupted stage resumes at its first missing chunk.
"""
from __future__ import annotations

import io
import json
import sys
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from datagen.format.atomic import atomic_write_bytes
from datagen.format.hashing import canonical_json

from ..score import pair_score

CHUNK = 256
"""Pairs per saved chunk."""
MAX_CHUNK_BYTES = 2 << 30
"""A chunk file larger than this is not read (a chunk of 256 pairs at 30 x 30 is ~3 MB)."""


@dataclass
class Predictions:
    """Predictions of P unordered pairs: ``pairs`` (P, 2) int (i < j), ``out_ij`` / ``out_ji``
    (P, 3, h, w) float16, ``scores`` (P, 2) float32 (Eq. 3 from i, from j)."""

    pairs: np.ndarray
    out_ij: np.ndarray
    out_ji: np.ndarray
    scores: np.ndarray

    @classmethod
    def empty(cls, grid: tuple[int, int]) -> Predictions:
        h, w = grid
        return cls(np.zeros((0, 2), np.int32), np.zeros((0, 3, h, w), np.float16),
                   np.zeros((0, 3, h, w), np.float16), np.zeros((0, 2), np.float32))

    @classmethod
    def concatenate(cls, parts: Sequence[Predictions], grid: tuple[int, int]) -> Predictions:
        if not parts:
            return cls.empty(grid)
        return cls(*(np.concatenate([getattr(p, name) for p in parts]) for name in
                     ("pairs", "out_ij", "out_ji", "scores")))

    def __len__(self) -> int:
        return len(self.pairs)


def unordered(pairs) -> np.ndarray:
    """(P, 2) int32 pairs with i < j, duplicates and self pairs removed, sorted."""
    array = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    array = np.sort(array, axis=1)
    array = array[array[:, 0] != array[:, 1]]
    return np.unique(array, axis=0).astype(np.int32) if len(array) else np.zeros((0, 2), np.int32)


def _chunk_bytes(part: Predictions) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, pairs=part.pairs.astype(np.int32), out_ij=part.out_ij.astype(np.float16),
             out_ji=part.out_ji.astype(np.float16), scores=part.scores.astype(np.float32))
    return buffer.getvalue()


def _read_chunk(path: Path, expected_pairs: np.ndarray, grid: tuple[int, int]) -> Predictions | None:
    """The chunk at ``path`` if it is sound and holds exactly ``expected_pairs``; None otherwise."""
    try:
        if path.stat().st_size > MAX_CHUNK_BYTES:
            return None
        with np.load(path, allow_pickle=False) as data:
            part = Predictions(data["pairs"], data["out_ij"], data["out_ji"], data["scores"])
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError):
        return None
    n = len(expected_pairs)
    shapes_ok = (part.out_ij.shape == (n, 3, *grid) and part.out_ji.shape == (n, 3, *grid)
                 and part.scores.shape == (n, 2) and part.out_ij.dtype == np.float16)
    if not shapes_ok or not np.array_equal(part.pairs, expected_pairs):
        return None
    if not (np.isfinite(part.out_ij).all() and np.isfinite(part.out_ji).all() and np.isfinite(part.scores).all()):
        return None
    return part


class PairStore:
    """The saved predictions of one discovery run (``folder`` = ``OUT/pairs``)."""

    def __init__(self, folder):
        self.folder = Path(folder)

    def _plan_path(self, stage: str) -> Path:
        return self.folder / f"{stage}.plan.json"

    def _chunk_path(self, stage: str, index: int) -> Path:
        return self.folder / f"{stage}-{index:06d}.npz"

    def predict(self, stage: str, pairs: np.ndarray, identity: dict, grid: tuple[int, int],
                run: Callable[[np.ndarray], Predictions], chunk: int = CHUNK, progress: bool = True) -> tuple[
                    Predictions, dict]:
        """The predictions of ``pairs`` ((P, 2) int, i < j) for ``stage``: chunks saved by an
        earlier run with the same plan (pairs, ``identity``, grid, chunk size) are read back, the
        others computed with ``run(pairs_of_chunk) -> Predictions`` and saved. Returns
        (predictions in the order of ``pairs``, {"pairs", "computed", "reused", "rejected"})."""
        pairs = np.asarray(pairs, dtype=np.int32).reshape(-1, 2)
        plan = {"stage": stage, "identity": identity, "grid": list(grid), "chunk": chunk, "pairs": pairs.tolist()}
        self.folder.mkdir(parents=True, exist_ok=True)
        plan_path = self._plan_path(stage)
        text = canonical_json(plan)
        try:
            same_plan = plan_path.read_text() == text
        except (OSError, UnicodeDecodeError):
            same_plan = False
        if not same_plan:
            for old in self.folder.glob(f"{stage}-*.npz"):
                old.unlink()
            atomic_write_bytes(plan_path, text.encode())
        parts, computed, reused, rejected = [], 0, 0, 0
        starts = range(0, len(pairs), chunk)
        with tqdm(total=len(pairs), unit="pair", desc=f"pairs ({stage})", disable=not progress or not len(pairs),
                  file=sys.stderr, dynamic_ncols=True) as bar:
            for index, start in enumerate(starts):
                expected = pairs[start: start + chunk]
                path = self._chunk_path(stage, index)
                part = _read_chunk(path, expected, grid) if path.exists() else None
                if part is None:
                    rejected += int(path.exists())
                    part = run(expected)
                    atomic_write_bytes(path, _chunk_bytes(part))
                    computed += len(expected)
                else:
                    reused += len(expected)
                parts.append(part)
                bar.update(len(expected))
        return Predictions.concatenate(parts, grid), {"pairs": len(pairs), "computed": computed, "reused": reused,
                                                      "damaged_chunks": rejected}


def network_runner(model: torch.nn.Module, features: Callable[[Sequence[int]], torch.Tensor],
                   grid: tuple[int, int], batch: int = 16) -> Callable[[np.ndarray], Predictions]:
    """A ``run`` for :meth:`PairStore.predict`: the network on pairs of images whose features
    ``features(indices) -> (n, C, h, w)`` gives (the feature cache's rows), ``batch`` pairs per
    forward pass, on the device of ``model``. Scores are Eq. 3 from each side with full regions."""
    device = next(model.parameters()).device

    @torch.no_grad()
    def run(pairs: np.ndarray) -> Predictions:
        parts = []
        for start in range(0, len(pairs), batch):
            chunk = pairs[start: start + batch]
            src = features(chunk[:, 0].tolist()).to(device, torch.float32)
            tgt = features(chunk[:, 1].tolist()).to(device, torch.float32)
            out_ij, out_ji = (out.float() for out in model.eval()(src, tgt))
            score_ij = pair_score(out_ij[:, 2:3], out_ji[:, 2:3], out_ij[:, :2], src, tgt)
            score_ji = pair_score(out_ji[:, 2:3], out_ij[:, 2:3], out_ji[:, :2], tgt, src)
            parts.append(Predictions(chunk.astype(np.int32), out_ij.half().cpu().numpy(),
                                     out_ji.half().cpu().numpy(),
                                     torch.stack([score_ij, score_ji], dim=1).cpu().numpy().astype(np.float32)))
        return Predictions.concatenate(parts, grid)

    return run


def top_neighbours(n_images: int, predictions: Predictions, k: int) -> np.ndarray:
    """(N, k) int: each image's k best partners by the Eq. 3 score with that image as the source
    (-1 where it has fewer than k scored partners); ties broken by the partner's index."""
    neighbours = np.full((n_images, k), -1, np.int64)
    candidates: list[list[tuple[float, int]]] = [[] for _ in range(n_images)]
    for (i, j), (score_ij, score_ji) in zip(predictions.pairs.tolist(), predictions.scores.tolist()):
        candidates[i].append((-score_ij, j))
        candidates[j].append((-score_ji, i))
    for image, found in enumerate(candidates):
        best = [partner for _, partner in sorted(found)[:k]]
        neighbours[image, : len(best)] = best
    return neighbours


def partner_pairs(neighbours: np.ndarray) -> list[tuple[int, int]]:
    """The pairs (a, b) of two partners of one image, for every image of ``neighbours`` (N, k)
    (-1 entries skipped): the third sides of the triangles through each image."""
    pairs = []
    for row in neighbours:
        partners = [int(p) for p in row if p >= 0]
        pairs += [(a, b) for x, a in enumerate(partners) for b in partners[x + 1:]]
    return pairs


def triangle_pairs(neighbours: np.ndarray, known: np.ndarray) -> np.ndarray:
    """The unordered pairs (j, n) of two neighbours of one image that ``known`` (P, 2) lacks: the
    predictions a 3-cycle through each image needs. At most N * k * (k - 1) / 2 of them."""
    candidates = unordered(partner_pairs(neighbours))
    if not len(candidates) or not len(known):
        return candidates
    known_keys = set(map(tuple, unordered(known).tolist()))
    return np.array([pair for pair in candidates.tolist() if tuple(pair) not in known_keys],
                    dtype=np.int32).reshape(-1, 2)


def plan_identity(**parts) -> dict:
    """A JSON-able identity for a plan (checked for equality, nothing else)."""
    return json.loads(canonical_json(parts))
