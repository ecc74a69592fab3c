"""``python -m transferlab COMMAND`` and the ``transferlab`` console script: the dispatcher in
``transferlab/commands/``."""
from .commands import main

if __name__ == "__main__":
    raise SystemExit(main())
