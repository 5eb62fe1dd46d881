"""Pair synthesis (paper section 3.1): from the segment bank to one training pair.

- :mod:`~datagen.synth.sampling`  seeded choices of one attempt: segments, background, warp parameters
- :mod:`~datagen.synth.geometry`  a segment's warp shaped and placed in the target, its outline, resampling
- :mod:`~datagen.synth.blend`     Poisson blending of the warped segment into the background
- :mod:`~datagen.synth.pairs`     the pair builder: a plan in, a :class:`~datagen.format.schema.PairSample` out
- :mod:`~datagen.synth.memory`    malloc settings that keep a worker's freed image memory for reuse
"""
