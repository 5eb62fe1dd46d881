"""Model selection during training: a small retrieval benchmark scored every N steps.

``trainer fit --val-retrieval FILE`` runs the Brueghel protocol
(:func:`trainer.retrieval.protocols.brueghel_benchmark`) on FILE, a Brueghel-format annotation
file (the ``retrieval.json`` that ``trainer retrieval-set`` writes from held-out shards, or the
Brueghel validation set), with the network as it is at that step: queries and database images at
the run's image size, the query prepared like a database image, Eq. 3. The mAP is written to
``validation.csv`` and TensorBoard (``val/map``); when it is the best so far the checkpoint is
also written to ``best.pt`` beside ``checkpoint.pt``. The backbone is frozen, so the database's
features are computed once, into ``RUN/val-features``, and read back at every evaluation.
"""
from __future__ import annotations

import csv
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

from datagen.format.atomic import atomic_write

VALIDATION_CSV = "validation.csv"
BEST_NAME = "best.pt"
FIELDS = ("step", "val_map", "queries", "best_map", "best_step", "seconds")


@dataclass(frozen=True)
class RetrievalValidation:
    """Where the benchmark is and how often it runs."""

    annotations: Path
    images: Path
    every: int = 1000

    @classmethod
    def from_options(cls, annotations, images=None, every: int = 1000) -> RetrievalValidation:
        """Checked at once (a bad file fails before training starts): ``images`` defaults to the
        ``images`` folder beside ``annotations`` (``trainer retrieval-set``'s layout)."""
        from .retrieval.datasets import read_brueghel

        annotations = Path(annotations)
        images = Path(images) if images is not None else annotations.parent / "images"
        if every < 1:
            raise ValueError(f"--val-every must be at least 1, got {every}")
        read_brueghel(annotations, images)  # every named image must be there
        return cls(annotations, images, every)


def validate(validation: RetrievalValidation, inference, run_dir: Path) -> dict:
    """The benchmark's result for ``inference`` (:class:`trainer.loop.Inference` of the network as
    it is): {"val_map", "queries", "seconds"}. Writes its files into ``run_dir/val-retrieval``."""
    import time

    from .retrieval.engine import Resolution
    from .retrieval.protocols import brueghel_benchmark
    from .retrieval.rank import RetrieveOptions

    size = inference.config.image_size
    options = RetrieveOptions(resolution=Resolution(size, size), box_side=None, score="eq3", batch=16,
                              cache_dir=Path(run_dir) / "val-features", progress=False)
    started = time.perf_counter()
    was_training = inference.model.training
    try:
        result = brueghel_benchmark(inference, validation.annotations, validation.images,
                                    Path(run_dir) / "val-retrieval", options)
    finally:
        inference.model.train(was_training)
    return {"val_map": result["mean"], "queries": result["queries"], "seconds": time.perf_counter() - started}


def is_better(value: float, best: dict | None) -> bool:
    """Whether mAP ``value`` beats the best so far (``{"value", "step"}`` or None); NaN never does."""
    if value is None or math.isnan(value):
        return False
    return best is None or value > best["value"]


def append_row(run_dir: Path, row: dict) -> None:
    """One row of ``validation.csv`` (header written when the file is new)."""
    path = Path(run_dir) / VALIDATION_CSV
    fresh = not path.is_file()
    with open(path, "a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS, extrasaction="ignore")
        if fresh:
            writer.writeheader()
        writer.writerow(row)


def keep_best(checkpoint: Path) -> Path:
    """Copy ``checkpoint`` to ``best.pt`` beside it, atomically."""
    with open(checkpoint, "rb") as source:
        return atomic_write(Path(checkpoint).parent / BEST_NAME, lambda handle: shutil.copyfileobj(source, handle))
