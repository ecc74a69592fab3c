"""``python -m transferlab.probe``: the ``probe`` command, in ``transferlab/commands/``."""
from .commands.probe import main

if __name__ == "__main__":
    raise SystemExit(main())
