"""``transferlab view`` on the command line: its checks before serving, the export under the
output policy, the one line when the view extra is missing."""
from __future__ import annotations

import socket

import numpy as np
import pytest

from tests.helpers import blobs, make_store
from transferlab.commands import main


@pytest.fixture
def small_store(tmp_path):
    x, y = blobs(n_per=20, k=3, d=6)
    return make_store(tmp_path / "store", x, y)


def test_export_writes_one_self_contained_file_and_refuses_to_replace_it(small_store,
                                                                         tmp_path, capsys):
    out = tmp_path / "report.html"
    before = [p.name for p in small_store.dir.iterdir()]
    assert main(["view", str(small_store.dir), "--export", str(out)]) == 0
    html = out.read_text(encoding="utf-8")
    assert '"static": true' in html and "Plotly" in html and '"rows": 60' in html
    assert 'src="http' not in html and "<script src=" not in html  # nothing fetched
    assert main(["view", str(small_store.dir), "--export", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    out.write_text("old")
    assert main(["view", str(small_store.dir), "--export", str(out), "--overwrite"]) == 0
    again = out.read_text(encoding="utf-8")  # the same report, its map read from the cache
    assert again == html.replace('"cached": false', '"cached": true')
    assert sorted(p.name for p in small_store.dir.iterdir()) == sorted(before + ["view-cache"])


def test_a_port_in_use_is_one_line(small_store, capsys):
    pytest.importorskip("uvicorn", reason='serving needs pip install "transferlab[view]"')
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code = main(["view", str(small_store.dir), "--port", str(port), "--no-browser"])
    err = capsys.readouterr().err
    assert code == 2 and f"127.0.0.1:{port}" in err and "--port" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("argv, words", [(["--port", "70000"], "--port"),
                                         (["--max-points", "1"], "--max-points")])
def test_bad_options_are_one_line(small_store, capsys, argv, words):
    assert main(["view", str(small_store.dir), *argv, "--no-browser"]) == 2
    err = capsys.readouterr().err
    assert words in err and len(err.strip().splitlines()) == 1


def test_without_the_view_extra_it_says_how_to_install_it(small_store, capsys, monkeypatch):
    import transferlab.viewer.webapp as webapp

    monkeypatch.setattr(webapp, "Starlette", None)
    assert main(["view", str(small_store.dir), "--no-browser"]) == 2
    err = capsys.readouterr().err
    assert 'pip install "transferlab[view]"' in err and len(err.strip().splitlines()) == 1


def test_the_map_is_printed_as_sampled_above_max_points(small_store, tmp_path, capsys):
    out = tmp_path / "r.html"
    assert main(["view", str(small_store.dir), "--max-points", "10", "--export", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "sample of 10 of 60 rows" in printed
    assert '"shown": 10' in out.read_text(encoding="utf-8")
    assert np.load(small_store.dir / "view-cache" / "map-pca.npz")["rows"].shape == (10,)


def test_a_hostile_key_cannot_close_the_reports_script(tmp_path):
    """Keys are written by whoever wrote the store: in the report's JSON every '<' is
    escaped, and the page sets them as text, never as HTML."""
    x, y = blobs(n_per=3, k=2, d=4)
    evil = "</script><script>document.title='owned'</script>.png"
    keys = [evil] + [f"k{i}.png" for i in range(5)]
    store = make_store(tmp_path / "store", x, y, keys=keys)
    out = tmp_path / "r.html"
    assert main(["view", str(store.dir), "--export", str(out)]) == 0
    html = out.read_text(encoding="utf-8")
    assert evil not in html and "document.title='owned'" in html.replace("\\u003c", "<")
    assert html.count("</script>") == html.count("<script")
