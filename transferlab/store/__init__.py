"""The feature store: a directory of .npy shards, a CSV index and JSON metadata.

- ``format``: file names, the layout, fingerprint comparison, small JSON helpers.
- ``files``: each of the store's own files read (checked before it is trusted) and written.
- ``owner``: which directories are stores; deleting only what a store wrote.
- ``recovery``: what a killed run finished, what to delete, what to redo.
- ``writer``: ``StoreWriter``, resumable and atomic, shards written on a background thread.
- ``reader``: ``FeatureStore``, memory-mapped shards and the index.
- ``merge``: the stores of several processes (torchrun) as one.
- ``rows``: the rows downstream tools read (plain views, labelled rows) as float32.
- ``export_formats``: a store as Parquet, HDF5, .npz or a ``{key: vector}`` pickle.
- ``faiss_index``: a FAISS index inside a store, for nearest-neighbour search at scale.
"""
