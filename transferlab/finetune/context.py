"""The state of one fine-tuning run that every stage shares: config, runtime, outputs, rank."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from ..config import FinetuneConfig
from ..models.classifier import Classifier
from ..runtime.device import Runtime, derive_seed
from ..runtime.distributed import DistInfo
from .outputs import MetricsLog


@dataclass
class Context:
    cfg: FinetuneConfig
    rt: Runtime
    out: Path
    metrics: MetricsLog
    info: DistInfo = field(default_factory=DistInfo)
    last_save: float = field(default_factory=time.perf_counter)  # of the last checkpoint
    _eval_batch: int | None = None

    @property
    def main(self) -> bool:
        """Whether this process writes the outputs (rank 0, or the only process)."""
        return self.info.is_main

    @property
    def progress(self) -> bool:
        return self.cfg.runtime.progress and self.main

    @property
    def worker_seed(self) -> int:
        """Seed of the loader workers (random augmentation): one stream per process."""
        return derive_seed(self.cfg.runtime.seed, "workers", self.info.rank)

    def eval_batch(self, net: Classifier) -> int:
        """Batch of ``net``'s no-grad passes (caching, evaluation): extraction's rule, worked
        out once per run (it counts the network's activations in a dummy forward)."""
        if self._eval_batch is None:
            self._eval_batch = net.batch_size(self.rt, self.cfg.runtime.batch_size)
        return self._eval_batch

    def checkpoint_due(self) -> bool:
        """Whether to rewrite the checkpoint after this epoch: at most every
        ``output.save_interval_s`` seconds, so fast epochs (cached features) are not
        dominated by rewriting a large frozen base; the final write always happens."""
        out = self.cfg.output
        if not (out.save_every_epoch and self.main):
            return False
        now = time.perf_counter()
        if now - self.last_save < out.save_interval_s:
            return False
        self.last_save = now
        return True
