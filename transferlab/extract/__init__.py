"""``python -m transferlab.extract``: frozen features of every image into a feature store.

- ``run``: ``run_extract(cfg)``: dataset, model, resume, loader, writer, ranks.
- ``batches``: the items of a run (views seeded per key, resume positions, aligned batches).
- ``queries``: a few images embedded as a store computed its rows (``embed_images``).
- ``__main__``: the command line.
"""
