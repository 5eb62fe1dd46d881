"""The build: segment bank and inputs, shard tasks run by a distributor, resume, and the lock on
``--out``, a local folder or a store URL (``datagen build``).

- :mod:`~datagen.runner.run`           :func:`build`: the steps in order, and the manifest
- :mod:`~datagen.runner.inputs`        source options, the inputs record and checksum, the segment bank
- :mod:`~datagen.runner.styling`       style options, the stylizer, a shard's drawn styles and batches
- :mod:`~datagen.runner.task`          :class:`ShardTask`: one shard, a picklable callable
- :mod:`~datagen.runner.distribute`    where tasks run: the :class:`Distributor` interface, in process, joblib
- :mod:`~datagen.runner.dask_distributor`  the same tasks on a Dask cluster (``--scheduler``)
- :mod:`~datagen.runner.worker_state`  what a process keeps between shards (bank, stylizer)
- :mod:`~datagen.runner.resume`        finished shards, another build's shards, leftovers of a killed one
- :mod:`~datagen.runner.store`         an ``--out`` in a store (``s3://``): work folder, shards uploaded one by one
- :mod:`~datagen.runner.errors`        :class:`BuildError`
- :mod:`~datagen.runner.lock`          one build per output folder or store URL; workers that die with their build
"""
