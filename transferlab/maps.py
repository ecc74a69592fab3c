"""``python -m transferlab.maps``: the ``maps`` command, in ``transferlab/commands/``."""
from .commands.maps import main

if __name__ == "__main__":
    raise SystemExit(main())
