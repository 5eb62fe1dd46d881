"""The build: segment bank and inputs, shard tasks run by a distributor, resume, and the lock on
``--out`` (``datagen build``).

- :mod:`~datagen.build.run`   inputs and bank preparation, shard tasks, resume, style serving, the build
- :mod:`~datagen.build.lock`  one build per output folder; workers that die with their build
"""
