"""``python -m transferlab.finetune``: a head trained on a frozen base.

- ``run``: ``run_finetune(cfg)``: checks, data, stages, summary.
- ``data``: the labelled data (resolved, loaded, split).
- ``model``: the architecture and weights a run starts from.
- ``stages``: pretrain, head, partial unfreeze, probe.
- ``outputs``: results, metrics log, confusion matrix, file names.
- ``parallel``: torchrun helpers (identity in one process).
- ``__main__``: the command line.
"""
