"""Training a head (or a whole model) of a ``models.classifier.Classifier`` on batches from
sources.

- ``sources``: where batches come from (tensors, memory-mapped arrays, a DataLoader).
- ``loop``: optimiser, schedule, epochs, evaluation (``fit``, ``evaluate``).
- ``cache``: the frozen base run once, its features cached in memory or on disk.
- ``parallel``: gradient sums, broadcasts and weight digests across torchrun processes.
"""
