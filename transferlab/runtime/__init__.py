"""Infrastructure every stage uses: where and how to compute, several processes, safe files.

- ``device``: the resolved runtime (device, precision, threads, channels_last), seeds.
- ``distributed``: torchrun process groups, ranks, gathers, per-rank folders.
- ``atomicfile``: files replaced atomically (write to a temporary name, rename on success).
- ``progress``: progress bars (tqdm) for the command-line entry points and notebooks.
"""
