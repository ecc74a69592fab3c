"""``python -m transferlab.predict``: the ``predict`` command, in ``transferlab/commands/``."""
from .commands.predict import main

if __name__ == "__main__":
    raise SystemExit(main())
