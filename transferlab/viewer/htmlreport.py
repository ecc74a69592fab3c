"""``transferlab view STORE --export report.html``: the page as one self-contained file.

The same page as the server's (``static/index.html`` + ``viewer.js``, plotly inlined), with
its data embedded: the map (the same binary arrays, base64), the curation galleries, and
thumbnails as data URIs for a bounded sample (the galleries' images first, then a seeded
random sample of the map's points, ``EXPORT_THUMBS`` in all) so a report of a million-row
store stays a few megabytes. What needs the server (nearest images, an uploaded query, the
key-prefix filter) says so on the page.
"""
from __future__ import annotations

import base64
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from ..runtime.userfiles import check_output, write_output
from .webapp import STATIC, ViewerData, page_html

EXPORT_THUMBS = 300  # thumbnails embedded, at most (about 5 KB each)
_GALLERY_ITEMS = 48  # entries of each gallery embedded


def _inline(name: str, tag: str) -> str:
    text = (STATIC / name).read_text(encoding="utf-8")
    # what would end the element early (none in the shipped files; escaped should one appear)
    text = re.sub(r"</(?=script|style)", r"<\\/", text, flags=re.I).replace("<!--", "<\\!--")
    return f"<{tag}>{text}</{tag}>"


def export_rows(data: ViewerData, limit: int = EXPORT_THUMBS, seed: int = 0) -> list[int]:
    """The rows whose thumbnails a report embeds: gallery entries first, then a seeded
    random sample of the map's points; ``limit`` at most."""
    chosen: dict[int, None] = {}
    for g in data.galleries.values():
        for item in g.items[:_GALLERY_ITEMS]:
            chosen.setdefault(item.row, None)
    rest = np.random.default_rng(seed).permutation(data.map.rows)
    for r in rest[:limit].tolist():
        chosen.setdefault(int(r), None)
    return list(chosen)[:limit]


def report_config(data: ViewerData, thumbs: int = EXPORT_THUMBS) -> dict:
    """The page's embedded data (what the server would answer, for a bounded sample)."""
    rows = export_rows(data, thumbs)
    images = {}
    for r in rows:
        jpeg = data.thumbs.jpeg(r)
        if jpeg is not None:
            images[str(r)] = "data:image/jpeg;base64," + base64.b64encode(jpeg).decode()
    galleries: dict[str, dict[str, Any]] = {}
    for name, g in data.galleries.items():
        galleries[name] = {"name": name, "title": g.title, "total": g.total,
                           "items": [dict(data.point(i.row), caption=i.caption, group=i.group)
                                     for i in g.items[:_GALLERY_ITEMS]]}
    info = data.info()
    for name, embedded in galleries.items():
        info["galleries"][name]["shown"] = len(embedded["items"])
    return {"static": True, "info": info,
            "map": base64.b64encode(data.map_bytes()).decode(),
            "thumbs": images, "galleries": galleries,
            "points": {str(r): {"key": data.store.keys[r]} for r in rows}}


def write_html_report(data: ViewerData, path: str | os.PathLike, overwrite: bool = False,
                      thumbs: int = EXPORT_THUMBS) -> Path:
    """Write the self-contained report (``runtime.userfiles``: an existing file is refused
    unless ``overwrite``; written whole or not at all)."""
    check_output(path, overwrite, "--export")
    head = _inline("viewer.css", "style") + _inline("plotly-gl2d.min.js", "script")
    html = page_html(report_config(data, thumbs), head, _inline("viewer.js", "script"))
    return write_output(path, lambda f: f.write(html), overwrite=overwrite, what="--export")
