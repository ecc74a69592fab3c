"""Which weights a backbone was built with, named by their content.

A store's fingerprint (and a query's check against it) names the weights by what they are,
never by how they were asked for: 'pretrained' says nothing once a folder's
``model.safetensors`` is replaced or a Hub revision moves on. Each library builder reports
what it read (``Backbone.weights_digest``; None: random initialisation):

- a timm model folder: the SHA-256 of its ``config.json`` and of the weights file timm
  reads from it (``{"files": {"config.json": ..., "model.safetensors": ...}}``);
- the Hub (``hf-hub:`` names, and timm names whose weights timm takes from the Hub): the
  repository, the commit its revision resolved to and the SHA-256 of each file read from
  the cache (``{"hub": ..., "revision": ..., "files": {...}}``);
- a timm or torchvision download: the downloaded file's name (torchvision's names carry a
  hash prefix) and its SHA-256 (``{"weights_file": ..., "sha256": ...}``);
- anything else that loads weights (``package.module:callable``, a layout these rules do
  not know): the SHA-256 of the built model's tensors (``{"state_sha256": ...}``).

``model.weights: FILE`` and a transferlab checkpoint are named by their file's SHA-256
(``weights_record``). No path enters a digest record, so the processes of a torchrun job on
several machines record the same weights alike.

A file's digest is computed once per process and remembered by (device, inode, size, mtime,
ctime): a second cut, a second query or a resume in the same process reads nothing again.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from ..errors import ModelError
from ..runtime.untrusted import open_untrusted

_BLOCK = 1 << 20
_DIGESTS: dict[tuple[int, ...], str] = {}
# what timm's load_state_dict_from_path looks for in a model folder, in its order (timm's own
# lists are used when it has them)
_FOLDER_FILES = ("model.safetensors", "pytorch_model.bin", "pytorch_model.pth", "model.pth",
                 "open_clip_model.safetensors", "open_clip_pytorch_model.safetensors",
                 "open_clip_pytorch_model.bin", "open_clip_pytorch_model.pth")
_FOLDER_EXTENSIONS = (".safetensors", ".pth", ".pth.tar", ".bin")
_HUB_DEFAULT_FILE = "pytorch_model.bin"
FOLDER_CONFIG = "config.json"
# the keys of a record that say where a file was, not what it holds (a store moved to
# another machine names its weights file elsewhere)
PLACE_KEYS = ("file", "checkpoint")


def file_digest(path: str | os.PathLike, what: str = "weights file") -> str:
    """The SHA-256 of a regular file (a FIFO or a device is refused in one line), hashed
    once per process for each (device, inode, size, mtime, ctime)."""
    with open_untrusted(path, what, ModelError) as handle:
        st = os.fstat(handle.fileno())
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        known = _DIGESTS.get(key)
        if known is not None:
            return known
        digest = hashlib.sha256()
        for block in iter(lambda: handle.read(_BLOCK), b""):
            digest.update(block)
    _DIGESTS[key] = value = digest.hexdigest()
    return value


def state_record(model: nn.Module) -> dict:
    """The SHA-256 of a module's tensors (names, dtypes, shapes and bytes, in name order)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return {"state_sha256": digest.hexdigest()}


def weights_record(name: str, weights: str | None, source: str, digest: dict | None,
                   seed: int) -> Any:
    """``fingerprint["weights"]``: what the rows' weights are, by content.

    ``name``, ``weights`` and ``source`` are the model config's ``name``, ``weights`` and the
    resolved source; ``digest`` is the built ``Backbone.weights_digest``; ``seed`` the
    runtime seed, which names random initial weights."""
    if weights:
        return {"file": str(Path(weights).resolve()), "sha256": file_digest(weights)}
    if source == "checkpoint":
        return {"checkpoint": str(Path(name).resolve()),
                "sha256": file_digest(name, "checkpoint")}
    if digest is not None:
        return digest
    return {"random_init_seed": seed}


def content(record: Any) -> Any:
    """A weights record without the keys that say where its file lay."""
    if isinstance(record, dict):
        return {k: v for k, v in record.items() if k not in PLACE_KEYS}
    return record


def has_digest(record: Any) -> bool:
    """Whether a recorded ``weights`` entry names weights by content (stores written before
    this rule record ``"pretrained"``)."""
    return isinstance(record, dict) and any(
        k in record for k in ("sha256", "state_sha256", "files"))


def short(record: Any) -> str:
    """A weights record in a few words: each file's name and the first 12 hex digits."""
    if not isinstance(record, dict):
        return repr(record)[:80]
    parts = []
    if isinstance(record.get("files"), dict):
        parts += [f"{n} {str(v)[:12]}" for n, v in record["files"].items()]
    for key in ("sha256", "state_sha256"):
        if key in record:
            label = record.get("weights_file") or record.get("file") or \
                record.get("checkpoint") or ("tensors" if key == "state_sha256" else "file")
            parts.append(f"{Path(str(label)).name} {str(record[key])[:12]}")
    if "random_init_seed" in record:
        parts.append(f"random initial weights (seed {record['random_init_seed']})")
    if record.get("revision"):
        parts.append(f"revision {str(record['revision'])[:12]}")
    return ", ".join(parts) or repr(record)[:80]


# ---------------------------------------------------------------------------------------
# What the library builders read
# ---------------------------------------------------------------------------------------


def timm_record(model: nn.Module, cache_dir: str | None = None,
                config_json: bool = False) -> dict:
    """The weights timm loaded into ``model`` (created with pretrained=True), found where
    timm's own resolution of its pretrained config put them; the tensors' digest when they
    cannot be found. ``config_json``: the Hub repository's config.json was read too (a
    ``hf-hub:`` name), and names the architecture."""
    try:
        from timm.models._builder import _resolve_pretrained_source

        load_from, where = _resolve_pretrained_source(dict(getattr(model, "pretrained_cfg",
                                                                   None) or {}))
    except (ImportError, AttributeError, AssertionError, TypeError):
        return state_record(model)
    record = None
    if load_from == "hf-hub":
        hub_id, filename = where if isinstance(where, (tuple, list)) else \
            (where, _HUB_DEFAULT_FILE)
        groups = [_hub_candidates(filename)] + ([[FOLDER_CONFIG]] if config_json else [])
        record = hub_record(str(hub_id), groups, cache_dir)
    elif load_from == "local-dir":
        record = folder_record(Path(where))
    elif load_from == "url":
        record = download_record(str(where), cache_dir)
    elif load_from == "file" and Path(str(where)).is_file():
        record = {"weights_file": Path(str(where)).name, "sha256": file_digest(str(where))}
    return record if record is not None else state_record(model)


def _hub_candidates(filename: str) -> list[str]:
    """The files timm tries for ``filename``, in its order (safetensors first)."""
    try:
        from timm.models._hub import _get_safe_alternatives

        safe = list(_get_safe_alternatives(filename))
    except ImportError:
        safe = ["model.safetensors"] if filename == _HUB_DEFAULT_FILE else \
            [filename[:-4] + ".safetensors"] if filename.endswith(".bin") else []
    return [*safe, filename]


def hub_record(hub_id: str, groups: list[list[str]], cache_dir: str | None = None
               ) -> dict | None:
    """The Hub files timm read, from the cache it read them from: for each group of
    candidates the first one cached. None when one cannot be found."""
    from huggingface_hub import constants, try_to_load_from_cache

    repo, _, revision = hub_id.partition("@")
    cache = cache_dir or constants.HF_HUB_CACHE
    files: dict[str, str] = {}
    commit = None
    for candidates in groups:
        for filename in candidates:
            found = try_to_load_from_cache(repo, filename, cache_dir=cache,
                                           revision=revision or None)
            if isinstance(found, str):
                files[filename] = file_digest(found)
                commit = commit or _snapshot_commit(Path(found), filename)
                break
        else:
            return None
    return {"hub": repo, "revision": commit or revision or None, "files": files}


def _snapshot_commit(path: Path, filename: str) -> str | None:
    """The commit of a file in the Hub cache: ``.../snapshots/<commit>/<filename>``."""
    folder = path
    for _ in Path(filename).parts:
        folder = folder.parent
    return folder.name if folder.parent.name == "snapshots" else None


def folder_record(folder: Path) -> dict | None:
    """A timm model folder: its config.json and the weights file timm reads from it."""
    weights = folder_weights_file(folder)
    if weights is None:
        return None
    return {"files": {FOLDER_CONFIG: file_digest(folder / FOLDER_CONFIG, "model config"),
                      weights.name: file_digest(weights)}}


def folder_weights_file(folder: Path) -> Path | None:
    """The file timm's ``load_state_dict_from_path`` loads from ``folder``."""
    try:
        from timm.models import _hub

        preferred = tuple(getattr(_hub, "_PREFERRED_FILES", _FOLDER_FILES))
        extensions = tuple(getattr(_hub, "_EXT_PRIORITY", _FOLDER_EXTENSIONS))
    except ImportError:
        preferred, extensions = _FOLDER_FILES, _FOLDER_EXTENSIONS
    for name in preferred:
        if (folder / name).exists():
            return folder / name
    for extension in extensions:
        files = sorted(folder.glob(f"*{extension}"))
        if files:
            return files[0]
    return None


def download_record(url: str, model_dir: str | None = None) -> dict | None:
    """A file ``torch.hub.load_state_dict_from_url`` downloaded (timm's and torchvision's
    pretrained weights): ``<model_dir or torch hub dir/checkpoints>/<the URL's file name>``."""
    name = os.path.basename(urlparse(url).path)
    folder = Path(model_dir) if model_dir else Path(torch.hub.get_dir()) / "checkpoints"
    path = folder / name
    if not name or not path.is_file():
        return None
    return {"weights_file": name, "sha256": file_digest(path)}


def torchvision_record(name: str, model: nn.Module) -> dict:
    """The default weights torchvision loaded into ``model`` (its download's digest)."""
    import torchvision

    try:
        url = torchvision.models.get_model_weights(name).DEFAULT.url
    except (ValueError, AttributeError, TypeError):
        url = ""
    return (download_record(url) if url else None) or state_record(model)
