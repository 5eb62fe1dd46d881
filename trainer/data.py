"""Reading datagen shards on the training side, through the schema module both sides share.

Samples are decoded with :func:`datagen.schema.decode_sample` only: raw bytes in, arrays out,
nothing is ever unpickled.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Iterator

import webdataset

from datagen.manifest import load_manifest
from datagen.schema import PairSample, decode_sample


def shard_urls(shards) -> list[str]:
    """Shard paths from a directory (its manifest.json if present, else its shard-*.tar), a
    manifest.json, a single .tar, or a list of those."""
    if isinstance(shards, (list, tuple)):
        return [url for item in shards for url in shard_urls(item)]
    path = Path(shards)
    if path.is_dir() and (path / "manifest.json").is_file():
        path = path / "manifest.json"
    if path.name.endswith(".json"):
        manifest = load_manifest(path)
        return [str(path.parent / entry["name"]) for entry in manifest["shards"]]
    if path.is_dir():
        urls = sorted(str(p) for p in path.glob("shard-*.tar"))
        if not urls:
            raise FileNotFoundError(f"no shard-*.tar in {path}")
        return urls
    if path.suffix == ".tar" and path.is_file():
        return [str(path)]
    raise FileNotFoundError(f"not a shard directory, manifest or .tar: {path}")


def iter_samples(shards) -> Iterator[PairSample]:
    """Decoded samples of ``shards`` in stored order."""
    dataset = webdataset.WebDataset(shard_urls(shards), shardshuffle=False, empty_check=False)
    for members in dataset:
        yield decode_sample({k: v for k, v in members.items() if k != "__url__"})


def summarise(shards) -> dict:
    """Counts of a shard set: samples, objects per pair, grid and image shapes."""
    objects, grids, images = Counter(), Counter(), Counter()
    for sample in iter_samples(shards):
        objects[len(sample.meta["objects"])] += 1
        grids[sample.src_grid_mask.shape] += 1
        images[sample.src_image.shape[:2]] += 1
    return {"samples": sum(objects.values()), "objects per pair": dict(objects),
            "grid": dict(grids), "image size": dict(images)}
