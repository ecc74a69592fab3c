"""``python -m transferlab.inspect``: the ``inspect`` command, in ``transferlab/commands/``."""
from .commands.inspection import main

if __name__ == "__main__":
    raise SystemExit(main())
