"""Retrieval with a trained network (paper section 4): Eq. 3 at collection scale.

- ``metrics``: ranking metrics (AP per query, mAP per category, recall@N within a radius,
  spatial non-maximum suppression, box IoU), pure functions.
- ``datasets``: the benchmarks' own files (Brueghel's JSON annotations, the place-recognition
  ``.mat`` files of Pitts30k and Tokyo 24/7, short-lists as CSV or parquet).
- ``cache``: backbone features computed once per image, float16 on disk (memory-mapped).
- ``engine``: images and regions prepared at the network's resolution, pairs scored in batches.
- ``protocols``: the paper's benchmarks (Brueghel one-shot retrieval, place recognition).
"""
