"""What each sparsification knob of the discovery graph costs in co-segmentation quality.

    python benchmarks/bench_discovery_quality.py [--copies 5] [--distractors 3] [--size 192] [--seeds 0 1 2]

The collection of the oracle test (tests/test_discover.py): one segment of the embedded sample
pasted by datagen's pair builder into ``--copies`` backgrounds, plus ``--distractors`` images
without it, and the predictions a perfect network would make (the builder's ground-truth
correspondences). For each setting, the graph's size and the co-segmentation's mean Jaccard over
the images holding the object and mean precision over all images are printed, averaged over the
seeds; baselines: the whole image and a centred box. Nothing asserts anything.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from discovery_helpers import SAMPLE, oracle_predictions, repeated_object_collection  # noqa: E402

from datagen.segments.bank import SegmentBank, write_bank  # noqa: E402
from datagen.segments.coco_source import CocoSource  # noqa: E402
from trainer.discovery.graph import GraphParams  # noqa: E402
from trainer.discovery.metrics import precision_jaccard  # noqa: E402
from trainer.discovery.pairs import top_neighbours  # noqa: E402
from trainer.discovery.run import DiscoverOptions, StageClock, discover_from_predictions  # noqa: E402

BASE = DiscoverOptions(k=3, graph=GraphParams(mask_threshold=0.5), progress=False)
SETTINGS = {
    "base (k 3, mask > 0.5, merge, 2+3-cycles, triangles)": BASE,
    "mask > 0.85 (the authors')": dataclasses.replace(BASE, graph=GraphParams(mask_threshold=0.85)),
    "no per-cell merging": dataclasses.replace(BASE, graph=GraphParams(mask_threshold=0.5, merge_cells=False)),
    "k 2": dataclasses.replace(BASE, k=2),
    "k 5": dataclasses.replace(BASE, k=5),
    "no triangle pairs": dataclasses.replace(BASE, close_triangles=False),
    "3-cycles only": dataclasses.replace(BASE, graph=GraphParams(mask_threshold=0.5, two_cycle=False)),
    "2-cycles only": dataclasses.replace(BASE, graph=GraphParams(mask_threshold=0.5, three_cycle=False)),
}


def scores(masks, truth) -> tuple[float, float]:
    pj = [precision_jaccard(mask, t) for mask, t in zip(masks, truth)]
    return float(np.mean([j for _, j in pj if j is not None])), float(np.mean([p for p, _ in pj]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--copies", type=int, default=5)
    parser.add_argument("--distractors", type=int, default=3)
    parser.add_argument("--size", type=int, default=192)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_bank(CocoSource(SAMPLE / "annotations" / "instances_train2017.json", SAMPLE / "train2017").scan(),
                   tmp / "bank")
        bank = SegmentBank.load(tmp / "bank")
        rows: dict[str, list] = {name: [] for name in [*SETTINGS, "baseline: whole image", "baseline: centre box"]}
        for seed in args.seeds:
            collection = repeated_object_collection(bank, args.copies, args.distractors, args.size, seed=seed)
            paths = collection.write(tmp / f"images{seed}")
            n = len(paths)
            predictions = oracle_predictions(collection, [(i, j) for i in range(n) for j in range(i + 1, n)])
            for name, options in SETTINGS.items():
                out = tmp / f"out{seed}-{abs(hash(name))}"
                clock = StageClock(say=lambda text: None)
                report = discover_from_predictions(paths, predictions, top_neighbours(n, predictions, options.k),
                                                   out, options, clock)
                masks = [cv2.imread(str(out / "masks" / f"{p.stem}.png"), cv2.IMREAD_GRAYSCALE) > 0 for p in paths]
                rows[name].append((*scores(masks, collection.truth), report["graph"]["n_vertices"],
                                   report["graph"]["n_edges"]))
            whole = np.ones((args.size, args.size), bool)
            centre = np.zeros_like(whole)
            centre[args.size // 4: 3 * args.size // 4, args.size // 4: 3 * args.size // 4] = True
            rows["baseline: whole image"].append((*scores([whole] * n, collection.truth), 0, 0))
            rows["baseline: centre box"].append((*scores([centre] * n, collection.truth), 0, 0))
    print(f"oracle co-segmentation, {args.copies} copies + {args.distractors} distractors at {args.size} px, "
          f"seeds {args.seeds}: mean over seeds")
    print(f"{'setting':<52} {'J':>6} {'P':>6} {'vertices':>9} {'edges':>8}")
    for name, values in rows.items():
        j, p, v, e = np.mean(values, axis=0)
        print(f"{name:<52} {j:6.3f} {p:6.3f} {v:9.0f} {e:8.0f}")


if __name__ == "__main__":
    main()
