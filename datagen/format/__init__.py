"""The on-disk contract between ``datagen`` and ``trainer``: what a shard set is and how to read it.

``trainer`` imports this package and nothing else of ``datagen`` (``tests/test_layout.py``), and
this package imports nothing else of ``datagen``.

- :mod:`~datagen.format.schema`    a sample's members, encoded and decoded (size checks first)
- :mod:`~datagen.format.shards`    reproducible tar writing and strict reading, per-sample checksums
- :mod:`~datagen.format.manifest`  per-sample parquet rows, per-shard stats, the manifest, fingerprint
- :mod:`~datagen.format.shardset`  what a shard-set argument names (folder, manifest, pattern, .tar)
- :mod:`~datagen.format.hashing`   file and config checksums
- :mod:`~datagen.format.imageio`   image decoding with size checks before decoding, resizing
- :mod:`~datagen.format.warps`     the stored warps: thin-plate spline and segment warp
- :mod:`~datagen.format.grids`     grid fields (correspondences, masks) recomputed from stored warps
- :mod:`~datagen.format.draw`      a pair drawn for a person: outlines and correspondence lines

And the few utilities both halves need, each in one place:

- :mod:`~datagen.format.atomic`    atomic file writes (``<name>.tmp``, fsync, rename)
- :mod:`~datagen.format.registry`  named registries (networks, style methods, segment sources)
- :mod:`~datagen.format.weights`   finding and reading weights files: one search order for every network
- :mod:`~datagen.format.device`    "auto", "cpu", "cuda:1" -> a torch device, with clear errors
- :mod:`~datagen.format.storage`   paths and URLs (http(s), s3, gs) read through fsspec
- :mod:`~datagen.format.locking`   an exclusive lock on a folder (flock) that names its holder
"""
