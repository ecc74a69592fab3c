"""``python -m transferlab.search``: the ``search`` command, in ``transferlab/commands/``."""
from .commands.search import main

if __name__ == "__main__":
    raise SystemExit(main())
