"""``transferlab view STORE``: a local web page over a feature store (issue #26).

Built from small, well-kept parts, all optional (``pip install "transferlab[view]"``):

- **Starlette + uvicorn** serve it. The page needs a dozen routes, binary responses,
  a thread pool for blocking work (thumbnails, embedding an uploaded image) and a test
  client; Starlette gives exactly that without FastAPI's validation layer or any database
  (FiftyOne's App needs MongoDB), and uvicorn is the ASGI server it is tested with.
- **plotly.js (the gl2d partial bundle, MIT)** draws the map with WebGL (``scattergl``),
  with box and lasso selection, hover and click events built in. The built file ships in
  ``static/`` (no build step at install, no CDN: the page works offline).

Modules: ``mapcache`` (the 2-D map, computed once and cached in ``STORE/view-cache/``),
``thumbnails`` (lazy, cached, from the data root only), ``galleries`` (clusters and the
curation findings read back), ``webapp`` (the ASGI app and its safety rules),
``htmlreport`` (``--export report.html``). Library code: nothing here prints.
"""
from __future__ import annotations

CACHE_DIR = "view-cache"  # inside the store: the only folder the viewer writes
