"""``python -m transferlab.extract``: the ``extract`` command, in ``transferlab/commands/``."""
from ..commands.extraction import main

if __name__ == "__main__":
    raise SystemExit(main())
