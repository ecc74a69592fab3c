"""Training a head (or a whole model) on batches from sources.

- ``sources``: where batches come from (tensors, memory-mapped arrays, a DataLoader).
- ``network``: normalisation, frozen base and head as one module; base layers, unfreezing.
- ``loop``: optimiser, schedule, epochs, evaluation (``fit``, ``evaluate``).
- ``cache``: the frozen base run once, its features cached in memory or on disk.
- ``parallel``: gradient sums and broadcasts across torchrun processes.
"""
