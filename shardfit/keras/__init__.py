"""The Keras adapter: ``Sequence``, a ``keras.utils.PyDataset`` over ``shardfit.read``.

Importing this package imports Keras (and its backend).
"""
