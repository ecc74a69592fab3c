"""``python -m transferlab.cluster``: the ``cluster`` command, in ``transferlab/commands/``."""
from .commands.cluster import main

if __name__ == "__main__":
    raise SystemExit(main())
