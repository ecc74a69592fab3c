"""``python -m transferlab.export``: the ``export`` command, in ``transferlab/commands/``."""
from .commands.export import main

if __name__ == "__main__":
    raise SystemExit(main())
