"""The saved pair predictions of a discovery run: resumed after an interruption, damaged chunks
recomputed, a changed plan started over; neighbours and the triangle pairs they need."""
from __future__ import annotations

import numpy as np
import pytest

from trainer.discovery.pairs import PairStore, Predictions, top_neighbours, triangle_pairs, unordered

GRID = (2, 3)


def fake_run(calls: list):
    """A ``run`` whose outputs encode the pair (so that a chunk read back can be recognised)."""
    def run(pairs: np.ndarray) -> Predictions:
        calls.append(pairs.tolist())
        n = len(pairs)
        out = np.zeros((n, 3, *GRID), np.float16)
        out[:, 0] = pairs[:, 0, None, None] / 100
        out[:, 1] = pairs[:, 1, None, None] / 100
        scores = np.stack([pairs[:, 0] + 0.5, pairs[:, 1] + 0.25], axis=1).astype(np.float32)
        return Predictions(pairs.astype(np.int32), out, out.copy(), scores)
    return run


def test_an_interrupted_stage_resumes_at_its_first_missing_chunk(tmp_path):
    pairs = unordered([(i, j) for i in range(6) for j in range(i + 1, 6)])  # 15 pairs
    store = PairStore(tmp_path)
    calls: list = []
    run = fake_run(calls)

    def failing(chunk):
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return run(chunk)

    with pytest.raises(KeyboardInterrupt):
        store.predict("shortlist", pairs, {"net": 1}, GRID, failing, chunk=4, progress=False)
    assert len(list(tmp_path.glob("shortlist-*.npz"))) == 2
    calls.clear()
    predictions, stats = store.predict("shortlist", pairs, {"net": 1}, GRID, run, chunk=4, progress=False)
    assert stats == {"pairs": 15, "computed": 7, "reused": 8, "damaged_chunks": 0}
    assert calls == [pairs[8:12].tolist(), pairs[12:].tolist()]
    assert np.array_equal(predictions.pairs, pairs)
    assert np.allclose(predictions.out_ij[:, 0, 0, 0], pairs[:, 0] / 100, atol=1e-3)

    # a damaged chunk is recomputed; a changed plan (another network) starts the stage over
    (tmp_path / "shortlist-000001.npz").write_bytes(b"garbage")
    calls.clear()
    _, stats = store.predict("shortlist", pairs, {"net": 1}, GRID, run, chunk=4, progress=False)
    assert stats["damaged_chunks"] == 1 and calls == [pairs[4:8].tolist()]
    calls.clear()
    _, stats = store.predict("shortlist", pairs, {"net": 2}, GRID, run, chunk=4, progress=False)
    assert stats["computed"] == 15 and len(calls) == 4


def test_a_chunk_holding_other_pairs_is_not_trusted(tmp_path):
    pairs = unordered([(0, 1), (0, 2), (1, 2)])
    store = PairStore(tmp_path)
    calls: list = []
    store.predict("s", pairs, {}, GRID, fake_run(calls), chunk=8, progress=False)
    other = PairStore(tmp_path / "other")
    other.predict("s", unordered([(0, 3), (1, 3), (2, 3)]), {}, GRID, fake_run([]), chunk=8, progress=False)
    (tmp_path / "s-000000.npz").write_bytes((tmp_path / "other" / "s-000000.npz").read_bytes())
    calls.clear()
    predictions, stats = store.predict("s", pairs, {}, GRID, fake_run(calls), chunk=8, progress=False)
    assert stats["damaged_chunks"] == 1 and np.array_equal(predictions.pairs, pairs)


def test_neighbours_by_score_and_the_pairs_that_close_their_triangles():
    pairs = unordered([(0, 1), (0, 2), (0, 3), (1, 2)])
    # scores from i then from j: image 0 prefers 3, then 2, then 1
    scores = np.array([[1.0, 5.0], [2.0, 1.0], [3.0, 0.0], [4.0, 6.0]], np.float32)
    predictions = Predictions(pairs, np.zeros((4, 3, *GRID), np.float16), np.zeros((4, 3, *GRID), np.float16),
                              scores)
    neighbours = top_neighbours(4, predictions, 2)
    assert neighbours.tolist() == [[3, 2], [0, 2], [1, 0], [0, -1]]  # image 1: 5.0 from (0, 1), 4.0 from (1, 2)
    assert triangle_pairs(neighbours, pairs).tolist() == [[2, 3]]  # (2, 3) closes image 0's; (0, 2), (0, 1) known
    assert unordered([(2, 1), (1, 2), (3, 3), (0, 4)]).tolist() == [[0, 4], [1, 2]]


def test_duplicates_and_border_pairs_are_found():
    from trainer.discovery.filters import border_pairs, border_share, duplicate_pairs

    h, w = 4, 5
    out = np.zeros((3, 3, h, w), np.float32)
    out[0, 2] = 0.95  # pair 0: everything matches (a duplicate)
    out[1, 2, 0, :] = 0.9  # pair 1: only the top row matches (a frame)
    out[1, 2, 1:3, 1:4] = 0.2  # not confident
    out[2, 2, 1:3, 1:4] = 0.9  # pair 2: an inner detail, 6 cells
    out[2, 2, 0, 0] = 0.9  # and one border cell: 1/7
    assert duplicate_pairs(out, out, 0.9).tolist() == [True, False, False]
    assert duplicate_pairs(out, out * np.array([1, 1, 0.5])[None, :, None, None], 0.9).tolist() == [False] * 3
    assert np.allclose(border_share(out, 0.85), [14 / 20, 1.0, 1 / 7])
    assert border_pairs(out, out, 0.85, share=0.5).tolist() == [True, True, False]
