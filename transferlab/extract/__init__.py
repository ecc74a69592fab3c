"""``python -m transferlab.extract``: frozen features of every image into a feature store.

- ``run``: ``run_extract(cfg)``: dataset, model, resume, loader, the loop, ranks.
- ``cutstore``: the store of each cut and what it records (fingerprint, config, meta).
- ``batches``: the items of a run (views seeded per key, resume positions, aligned batches).
- ``reduce``: ``output.reduce`` projections (srp, pca).
- ``queries``: a few images embedded as a store computed its rows (``embed_images``).
- ``__main__``: the command line.

The images go through the frozen-forward engine, ``models.engine.FeatureComputer``.
"""
