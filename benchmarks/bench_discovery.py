"""Time and memory of the discovery graph (trainer.discovery.graph / spectral) against the number of
images N, on synthetic predictions (no network).

    python benchmarks/bench_discovery.py [--sizes 1000 10000 100000] [--k 5] [--planted 100]
        [--grid 30] [--noise 0.01] [--background 0.3] [--eig100] [--eig100-max 10000] [--memory-gb 24]
        [--no-knobs] [--seed 0]

Predictions: every image picks --k neighbours (non-planted images within a window of 3k images on a
ring, so that triangles, hence 3-cycles, exist at every N; pairs deduplicated, stored once, in a
random orientation). A planted object (a square of 5 to 9 cells at a random place, one per image)
is in --planted images, which pick their neighbours among themselves with probability 0.8 (a
retrieval that works) and anywhere otherwise; between two of them the predictions send the object
onto the other's object (scaled, 20% of cells one cell off) with masks in [0.9, 1). Every other
cell has a mask in [0, 0.8), except --noise of them (spurious, in [0.85, 1)) with random
correspondences; and a pair of non-planted images shares, with probability --background, a 3 x 3
background patch of each image (masks in [0.86, 0.95), consistent correspondences: distractors whose
edges grow with N). float16 arrays, as the network's outputs are stored. Making them is not timed.

Stages, each timed (wall) with its peak memory (tracemalloc: numpy's allocations, beyond what was
held before the stage) and the process's peak RSS: ``vertices``, ``graph`` (build_graph, vertices
included), ``eig k=1`` and, with --eig100 up to --eig100-max images, ``eig k=100``. Then the fitted
growth exponent of each stage's time against N (least squares on log-log, over all sizes and over
the last two), and a quality check: the share of planted vertices (object cell of a planted pair)
among the |planted| largest entries of the first eigenvector; beside it the share of the vector's
mass (sum of squares) on planted vertices and the share of planted vertices among its support
(entries above 1e-3 of its largest): the leading eigenvector of such graphs tends to concentrate on
the most strongly connected part of the object's vertices, which lowers the first figure while the
other two stay near 1. At N=1000 (or the smallest size) the sparsification knobs: mask threshold, k,
merge_cells. Before each size the memory is estimated from the previous one (predictions are
exact; the rest scaled linearly); a size whose estimate exceeds --memory-gb is not run, and the
run stops saying so. Nothing asserts speed.
"""
from __future__ import annotations

import argparse
import sys
import time
import tracemalloc
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trainer.discovery.graph import GraphParams, build_graph, vertices  # noqa: E402
from trainer.discovery.spectral import leading_eigenvectors  # noqa: E402

GB = 1 << 30


# --------------------------------------------------------------------------------------------------
# synthetic predictions


def make_neighbours(n: int, k: int, n_planted: int, rng: np.random.Generator, p_in: float = 0.8) -> np.ndarray:
    """(P, 2) unordered pairs, each once, random orientation: k picks per image (see the docstring)."""
    src = np.repeat(np.arange(n, dtype=np.int64), k)
    dst = (src + rng.integers(1, 3 * k + 1, src.size)) % n  # a window of the ring
    planted = src < n_planted
    inside = planted & (rng.random(src.size) < p_in)
    if n_planted > 1:
        dst[inside] = (src[inside] + rng.integers(1, n_planted, int(inside.sum()))) % n_planted
    anywhere = planted & ~inside
    dst[anywhere] = rng.integers(0, n, int(anywhere.sum()))
    keep = dst != src
    lo, hi = np.minimum(src, dst)[keep], np.maximum(src, dst)[keep]
    key = np.unique(lo * n + hi)
    pairs = np.stack([key // n, key % n], axis=1)
    flip = rng.random(len(pairs)) < 0.5
    pairs[flip] = pairs[flip][:, ::-1]
    return pairs


def make_predictions(n: int, k: int, n_planted: int, grid: int, noise: float, seed: int,
                     background: float = 0.3) -> dict:
    rng = np.random.default_rng(seed)
    n_planted = min(n_planted, n)
    pairs = make_neighbours(n, k, n_planted, rng)
    cells = grid * grid
    side = rng.integers(5, 10, n_planted)
    corner = np.stack([rng.integers(0, grid - s + 1, 2) for s in side]) if n_planted else np.zeros((0, 2), int)
    patch = rng.integers(0, grid - 2, (n, 2))  # each image's background patch (3 x 3 cells)
    outs = []
    for _ in range(2):
        out = np.empty((len(pairs), 3, grid, grid), np.float16)
        flat = out.reshape(len(pairs), 3, cells)
        step = max(1, (1 << 22) // cells)
        for start in range(0, len(pairs), step):
            m = rng.random((min(step, len(pairs) - start), cells), dtype=np.float32) * 0.8
            spurious = rng.random(m.shape, dtype=np.float32) < noise
            m[spurious] = 0.85 + 0.15 * rng.random(int(spurious.sum()), dtype=np.float32)
            flat[start:start + step, 2] = m
            flat[start:start + step, 0] = rng.random(m.shape, dtype=np.float32)
            flat[start:start + step, 1] = rng.random(m.shape, dtype=np.float32)
        outs.append(out)
    # distractors: a pair of non-planted images shares its two background patches with probability `background`
    shared = np.flatnonzero((pairs.min(axis=1) >= n_planted) & (rng.random(len(pairs)) < background))
    dr, dc = (a.ravel() for a in np.mgrid[0:3, 0:3])
    for direction, out in enumerate(outs):
        a, b = pairs[shared, direction], pairs[shared, 1 - direction]
        index = np.repeat(shared, 9)
        r, c = (patch[a, 0, None] + dr).ravel(), (patch[a, 1, None] + dc).ravel()
        out[index, 0, r, c] = ((patch[b, 1, None] + dc).ravel() + 0.5) / grid
        out[index, 1, r, c] = ((patch[b, 0, None] + dr).ravel() + 0.5) / grid
        out[index, 2, r, c] = rng.uniform(0.86, 0.95, index.size)
    both = np.flatnonzero((pairs[:, 0] < n_planted) & (pairs[:, 1] < n_planted))
    for index in both:
        for direction, out in enumerate(outs):
            a, b = pairs[index] if direction == 0 else pairs[index][::-1]
            rows, cols = np.mgrid[0:side[a], 0:side[a]]
            to_row = corner[b, 0] + ((rows + 0.5) * side[b] / side[a]).astype(int)
            to_col = corner[b, 1] + ((cols + 0.5) * side[b] / side[a]).astype(int)
            off = rng.random(rows.shape) < 0.2  # one cell off, in a random direction
            to_row = np.clip(to_row + off * rng.integers(-1, 2, rows.shape), 0, grid - 1)
            to_col = np.clip(to_col + off * rng.integers(-1, 2, rows.shape), 0, grid - 1)
            r, c = rows + corner[a, 0], cols + corner[a, 1]
            out[index, 0, r, c] = (to_col + 0.5) / grid
            out[index, 1, r, c] = (to_row + 0.5) / grid
            out[index, 2, r, c] = rng.uniform(0.9, 1.0, rows.shape)
    return {"pairs": pairs, "out_ij": outs[0], "out_ji": outs[1], "n_planted": n_planted, "side": side,
            "corner": corner, "grid": grid}


def planted_mask(verts, data: dict) -> np.ndarray:
    """Vertices of a pair of planted images whose anchor cell is in its image's object."""
    n_planted, grid = data["n_planted"], data["grid"]
    both = (verts.image < n_planted) & (verts.partner < n_planted)
    image = np.where(both, verts.image, 0)
    row, col = verts.cell // grid, verts.cell % grid
    if n_planted == 0:
        return np.zeros(len(verts), bool)
    top, left, side = data["corner"][image, 0], data["corner"][image, 1], data["side"][image]
    return both & (row >= top) & (row < top + side) & (col >= left) & (col < left + side)


# --------------------------------------------------------------------------------------------------
# measuring


def peak_rss() -> int:
    """Peak resident memory of the process since the last reset (bytes; Linux, else 0)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def reset_peak_rss() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def timed(function, *args, **kwargs):
    """(result, seconds, peak bytes allocated beyond what was held before, peak RSS bytes)."""
    tracemalloc.reset_peak()
    held = tracemalloc.get_traced_memory()[0]
    reset_peak_rss()
    start = time.perf_counter()
    result = function(*args, **kwargs)
    seconds = time.perf_counter() - start
    return result, seconds, tracemalloc.get_traced_memory()[1] - held, peak_rss()


def eig_memory(n_vertices: int, k: int) -> int:
    """ARPACK's Lanczos basis (max(2k + 1, 20) float64 vectors) and the float64 copy of the matrix
    are the large parts; the matrix is counted by the caller."""
    return n_vertices * max(2 * k + 1, 20) * 8 * 2


def fit_exponent(sizes: list[int], values: list[float]) -> float:
    if len(sizes) < 2 or min(values) <= 0:
        return float("nan")
    return float(np.polyfit(np.log(sizes), np.log(values), 1)[0])


def fmt_bytes(value: float) -> str:
    return f"{value / GB:.2f} GB" if value >= GB / 10 else f"{value / (1 << 20):.0f} MB"


# --------------------------------------------------------------------------------------------------


def run_size(n: int, args, eig100: bool) -> dict:
    start = time.perf_counter()
    data = make_predictions(n, args.k, args.planted, args.grid, args.noise, args.seed, args.background)
    made = time.perf_counter() - start
    pred_bytes = data["out_ij"].nbytes + data["out_ji"].nbytes
    print(f"\nN={n}: {len(data['pairs'])} pairs, predictions {fmt_bytes(pred_bytes)} float16 "
          f"(made in {made:.1f} s, not timed)", flush=True)
    params = GraphParams()
    row = {"n": n, "pairs": len(data["pairs"]), "pred_bytes": pred_bytes}
    verts, t, mem, rss = timed(vertices, data["pairs"], data["out_ij"], data["out_ji"], params)
    row["vertices"] = (t, mem, rss)
    del verts
    graph, t, mem, rss = timed(build_graph, data["pairs"], data["out_ij"], data["out_ji"], n, params)
    row["graph"] = (t, mem, rss)
    row["stats"] = graph.stats
    row["graph_bytes"] = graph.weights.data.nbytes + graph.weights.indices.nbytes + graph.weights.indptr.nbytes
    (values, vectors), t, mem, rss = timed(leading_eigenvectors, graph.weights, 1)
    row["eig k=1"] = (t, mem, rss)
    planted = planted_mask(graph.vertices, data)
    n_planted = int(planted.sum())
    top = np.argpartition(-vectors[:, 0], n_planted - 1)[:n_planted] if n_planted else np.zeros(0, int)
    row["quality"] = float(planted[top].mean()) if n_planted else float("nan")
    v = vectors[:, 0]
    support = v > 1e-3 * v.max() if v.size else np.zeros(0, bool)
    row["mass"] = float((v[planted] ** 2).sum())
    row["support"] = (float(planted[support].mean()) if support.any() else float("nan"), int(support.sum()))
    row["n_planted_vertices"] = n_planted
    if eig100:
        need = eig_memory(graph.stats.n_vertices, 100) + graph.weights.nnz * 12
        if need > args.memory_gb * GB:
            print(f"  eig k=100 skipped: about {fmt_bytes(need)} needed", flush=True)
        else:
            (values, vectors), t, mem, rss = timed(leading_eigenvectors, graph.weights, 100)
            row["eig k=100"] = (t, mem, rss)
    s = graph.stats
    print(f"  vertices {s.n_vertices} ({n_planted} planted), edges {s.n_edges} (2-cycle {s.n_two_cycle_edges}, "
          f"3-cycle {s.n_three_cycle_edges}), CSR {fmt_bytes(row['graph_bytes'])}", flush=True)
    print(f"  triplets closed {s.n_triplets_closed}, lacking the third prediction {s.n_triplets_open}; "
          f"candidate vertex pairs {s.n_candidates} ({s.n_candidates_missing_third} without a third prediction)")
    for stage in ("vertices", "graph", "eig k=1", "eig k=100"):
        if stage in row:
            t, mem, rss = row[stage]
            print(f"  {stage:10s} {t:8.2f} s   peak +{fmt_bytes(mem):>9s} (numpy)   process peak RSS {fmt_bytes(rss)}")
    print(f"  quality: {row['quality']:.3f} of the top-{n_planted} entries of the first eigenvector are planted; "
          f"{row['mass']:.4f} of its mass is on planted vertices; {row['support'][0]:.3f} of its "
          f"{row['support'][1]} entries above 1e-3 of its largest are planted", flush=True)
    return row


def knobs(n: int, args) -> None:
    data = make_predictions(n, args.k, args.planted, args.grid, args.noise, args.seed, args.background)
    print(f"\nSparsification knobs at N={n} (k={args.k} unless said): vertices, edges, build time")
    base = GraphParams()
    settings = [(f"mask_threshold {m}", replace(base, mask_threshold=m), None) for m in (0.75, 0.85, 0.95)]
    settings += [(f"k {k}", base, k) for k in (3, 5, 10)]
    settings += [(f"merge_cells {merge}", replace(base, merge_cells=merge), None) for merge in (True, False)]
    settings += [(f"sigma {sigma}", replace(base, sigma=sigma), None) for sigma in (0.8, 1.2, 5.0)]
    for name, params, k in settings:
        d = data if k is None else make_predictions(n, k, args.planted, args.grid, args.noise, args.seed,
                                                    args.background)
        start = time.perf_counter()
        graph = build_graph(d["pairs"], d["out_ij"], d["out_ji"], n, params)
        seconds = time.perf_counter() - start
        print(f"  {name:22s} pairs {len(d['pairs']):7d}  vertices {graph.stats.n_vertices:9d}  "
              f"edges {graph.stats.n_edges:10d}  {seconds:7.2f} s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--k", type=int, default=5, help="neighbours per image (the authors' top-k: 5)")
    parser.add_argument("--planted", type=int, default=100, help="images holding the planted object")
    parser.add_argument("--grid", type=int, default=30)
    parser.add_argument("--noise", type=float, default=0.01, help="share of spurious confident cells")
    parser.add_argument("--background", type=float, default=0.3, help="share of non-planted pairs with a distractor")
    parser.add_argument("--eig100", action="store_true", help="also time 100 eigenvectors (minutes at N=10000)")
    parser.add_argument("--eig100-max", type=int, default=10000, help="with --eig100, up to this N")
    parser.add_argument("--memory-gb", type=float, default=24.0)
    parser.add_argument("--no-knobs", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    tracemalloc.start()
    sizes = sorted(set(args.sizes))
    rows: list[dict] = []
    for n in sizes:
        if rows:
            prev = rows[-1]
            scale = n / prev["n"]
            pred = prev["pred_bytes"] * scale
            work = max(prev[stage][1] for stage in ("vertices", "graph", "eig k=1")) * scale
            eig = eig_memory(int(prev["stats"].n_vertices * scale), 100) if args.eig100 and n <= args.eig100_max else 0
            estimate = pred + max(work, eig) * 1.2
            seconds = sum(prev[stage][0] for stage in ("vertices", "graph", "eig k=1", "eig k=100")
                          if stage in prev) * scale
            print(f"\nN={n}: estimated memory {fmt_bytes(estimate)} (predictions {fmt_bytes(pred)}, graph and "
                  f"eigenvectors {fmt_bytes(estimate - pred)}), time about {seconds:.0f} s", flush=True)
            if estimate > args.memory_gb * GB:
                stage = max(("vertices", "graph", "eig k=1"), key=lambda name: prev[name][1])
                why = {"vertices": "the vertex arrays while they are sorted and merged",
                       "graph": "the per-vertex arrays of the neighbour join (about 100 bytes per vertex) and the "
                                "edges (12 bytes per stored entry while assembled, 8 in CSR)",
                       "eig k=1": "ARPACK's Lanczos basis (20 float64 vectors of length V) and the float64 copy of "
                                  "the weights"}[stage]
                print(f"N={n} not run: the estimate exceeds --memory-gb {args.memory_gb:g}. What bounds N is "
                      f"memory: the float16 predictions ({prev['pred_bytes'] / prev['n'] / 1e3:.0f} kB per image "
                      f"at k={args.k}, both directions, held by the caller), plus the largest stage, {stage} "
                      f"({prev[stage][1] / prev['n'] / 1e3:.0f} kB per image: {why}).", flush=True)
                break
        rows.append(run_size(n, args, eig100=args.eig100 and n <= args.eig100_max))

    if len(rows) > 1:
        print("\nGrowth exponent of time against N (log-log least squares; 1 = linear):")
        sizes_run = [r["n"] for r in rows]
        for stage in ("vertices", "graph", "eig k=1", "eig k=100"):
            have = [r for r in rows if stage in r]
            if len(have) > 1:
                n_have = [r["n"] for r in have]
                print(f"  {stage:10s} time {fit_exponent(n_have, [r[stage][0] for r in have]):5.2f} "
                      f"(last two sizes {fit_exponent(n_have[-2:], [r[stage][0] for r in have[-2:]]):5.2f}),  "
                      f"peak memory {fit_exponent(n_have, [max(r[stage][1], 1) for r in have]):5.2f} "
                      f"(last two {fit_exponent(n_have[-2:], [max(r[stage][1], 1) for r in have[-2:]]):5.2f})")
        print(f"  vertices count {fit_exponent(sizes_run, [r['stats'].n_vertices for r in rows]):5.2f}, "
              f"edges count {fit_exponent(sizes_run, [max(r['stats'].n_edges, 1) for r in rows]):5.2f}")
    print("\nSummary:")
    print(f"  {'N':>7s} {'pairs':>8s} {'vertices':>9s} {'edges':>10s} " + " ".join(
        f"{s + ' s':>11s}" for s in ("vertices", "graph", "eig k=1", "eig k=100")) + "  quality")
    for r in rows:
        times = " ".join(f"{r[s][0]:11.2f}" if s in r else f"{'-':>11s}" for s in ("vertices", "graph", "eig k=1",
                                                                                    "eig k=100"))
        print(f"  {r['n']:7d} {r['pairs']:8d} {r['stats'].n_vertices:9d} {r['stats'].n_edges:10d} {times}"
              f"  {r['quality']:.3f}")
    if not args.no_knobs:
        knobs(min(sizes[0], 1000), args)


if __name__ == "__main__":
    main()
