"""The feature store: a directory of .npy shards, a CSV index and JSON metadata.

- ``format``: file names, the layout, fingerprint comparison, small JSON helpers.
- ``writer``: ``StoreWriter``, resumable and atomic, shards written on a background thread.
- ``reader``: ``FeatureStore``, memory-mapped shards and the index.
- ``merge``: the stores of several processes (torchrun) as one.
"""
