"""Reading, in data-flow order: shard files -> samples (``_reader``) -> which samples each batch
of each epoch holds (``_epoch``, pure functions of (seed, epoch); ``_order``, what is served at
each position as the consumer asks) -> one batch built and transformed (``_batch``) into reused
buffers (``_buffers``), or in worker processes (``_workers``) that write into a shared-memory
ring (``_shm``).

Nothing here imports a deep-learning framework: the Keras adapter (``shardfit.keras``) is a thin
layer over this package.
"""
