"""``python -m transferlab.index``: the ``index`` command, in ``transferlab/commands/``."""
from .commands.index import main

if __name__ == "__main__":
    raise SystemExit(main())
