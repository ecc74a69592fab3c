"""The feature store: a directory of .npy shards, a CSV index and JSON metadata.

Writing and reading:

- ``format``: the layout (documented there), file names, fingerprint comparison, JSON helpers.
- ``files``: each of a store's own files read (checked before it is trusted) and written.
- ``writer``: ``StoreWriter``, resumable and atomic, shards written on a background thread.
- ``recovery``: reopening a store a killed run left (what is finished, what to redo).
- ``owner``: which directories are stores, and deleting only what a store wrote.
- ``merge``: the stores of several processes (torchrun) as one.
- ``reader``: ``FeatureStore``, memory-mapped shards and the index.

Downstream of a finished store:

- ``rows``: which rows the downstream tools read, as float32.
- ``export_formats``: the store in other tools' formats (Parquet, HDF5, .npz, pickle).
- ``faiss_index``: a FAISS index inside the store, for nearest-neighbour search at scale.
"""
