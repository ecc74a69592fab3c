"""Progress bars: tqdm's notebook widget when ipywidgets can draw it, else the text bar."""
from __future__ import annotations

import importlib.util
from typing import Any


def tqdm_bar(*args: Any, **kwargs: Any) -> Any:
    """``tqdm(*args, **kwargs)``; ``tqdm.auto`` alone warns "IProgress not found" in a
    notebook without ipywidgets, so it is used only where the widgets exist."""
    if importlib.util.find_spec("ipywidgets") is not None:
        from tqdm.auto import tqdm
    else:
        from tqdm import tqdm
    return tqdm(*args, **kwargs)
