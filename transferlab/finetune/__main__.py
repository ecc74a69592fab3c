"""``python -m transferlab.finetune``: the ``finetune`` command, in ``transferlab/commands/``."""
from ..commands.finetuning import main

if __name__ == "__main__":
    raise SystemExit(main())
