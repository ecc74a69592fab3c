"""Bounded YAML reading for configs: ``yaml.safe_load`` semantics with limits; bounded JSON
reading for metadata (``loads_json``: nesting measured before parsing).

A config is small, but YAML aliases let a few hundred bytes stand for billions of nodes
(the "billion laughs"). PyYAML shares aliased nodes, so composing is cheap; what explodes
is everything that walks the result (an error message echoing a value, a copy). So the
composed node graph is measured as if expanded, with memoised sub-counts (no expansion),
before any Python object is built. Values echoed in messages are cut to ``MAX_SHOWN``.
"""
from __future__ import annotations

import json
import re
import reprlib
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from .errors import ConfigError
from .runtime.untrusted import file_size, open_untrusted

MAX_BYTES = 1 << 20  # a config file larger than 1 MiB is surely not a config
MAX_NODES = 100_000  # scalars, lists and mappings after alias expansion
MAX_SHOWN = 200  # characters of a value echoed in an error message
MAX_JSON_DEPTH = 64  # nesting of metadata JSON (transferlab's own nests less than 10 deep)
# A number as YAML 1.1 fails to read it: PyYAML takes 1e-3 (no dot) for a string
FLOAT_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")

_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict, _REPR.maxtuple = 3, 8, 8, 8
_REPR.maxstring = _REPR.maxother = MAX_SHOWN


class YamlSyntaxError(ConfigError):
    """Text that is not valid YAML (line:column and the problem, on one line)."""


def shown(value: Any) -> str:
    """``repr(value)`` bounded to ``MAX_SHOWN`` characters, without walking all of it."""
    text = _REPR.repr(value)
    return text if len(text) <= MAX_SHOWN else text[:MAX_SHOWN - 3] + "..."


def shown_text(text: str) -> str:
    """A key or value as typed, quoted only when it holds control characters, cut short."""
    if not text.isprintable():
        return shown(text)
    return text if len(text) <= MAX_SHOWN else text[:MAX_SHOWN - 3] + "..."


def read_yaml_file(path: Path) -> Any:
    """The parsed content of a YAML file (None when empty); every problem is a ConfigError."""
    if path.is_dir():
        raise ConfigError(f"config path {path} is a directory, not a YAML file; pass the file "
                          f"itself (e.g. {path / 'config.yaml'})")
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    # a regular file only (a FIFO or /dev/zero named as the config never blocks or fills
    # memory), read once, at most MAX_BYTES
    with open_untrusted(path, "config file", ConfigError) as handle:
        size = file_size(handle)
        if size > MAX_BYTES:
            raise ConfigError(f"config file {path} is {size} bytes; configs are at most "
                              f"{MAX_BYTES} bytes: is it the right file?")
        raw = handle.read(MAX_BYTES + 1)[:MAX_BYTES]
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte 0x{raw[exc.start]:02x} "
                          f"at offset {exc.start}); save it as UTF-8") from None
    return load_yaml_text(text, str(path))


def load_yaml_text(text: str, source: str, max_nodes: int = MAX_NODES) -> Any:
    """``yaml.safe_load(text)``, refusing documents that expand beyond ``max_nodes`` nodes."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        expanded_size(node, max_nodes, source)
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        raise YamlSyntaxError(syntax_message(exc, source)) from None
    except RecursionError:
        raise ConfigError(f"{source} nests too deeply to be a config; flatten it") from None
    finally:
        loader.dispose()


def expanded_size(root: yaml.Node, limit: int, source: str) -> int:
    """Nodes of ``root`` with every alias expanded, counted without expanding (memoised)."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(node: yaml.Node) -> int:
        known = sizes.get(id(node))
        if known is not None:
            return known
        if id(node) in open_nodes:
            raise ConfigError(f"{source} holds an alias that refers to itself (a recursive "
                              "structure); write the values out instead")
        open_nodes.add(id(node))
        total = 1
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [part for pair in node.value for part in pair]
        else:
            children = []
        for child in children:
            total += size(child)
            if total > limit:
                raise ConfigError(f"{source} expands to more than {limit} values (through "
                                  "YAML aliases '*name'); a config is small: remove the "
                                  "aliases that repeat other aliases")
        open_nodes.discard(id(node))
        sizes[id(node)] = total
        return total

    return size(root)


def syntax_message(exc: yaml.YAMLError, source: str) -> str:
    """One line: ``SOURCE:LINE:COLUMN: not valid YAML: problem (context)`` and a hint."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None)
    if problem is None:
        return f"{source} is not valid YAML: {shown_text(' '.join(str(exc).split()))}"
    where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark is not None else source
    context = getattr(exc, "context", None)
    detail = f"{problem} ({context})" if context else problem
    return (f"{where}: not valid YAML: {shown_text(' '.join(detail.split()))}; fix it there "
            "(indent with spaces; quote values holding ': ' or ' #')")


def check_colon_keys(value: dict, key: str, source: str) -> None:
    """``{drop_rate:0.5}`` is YAML for {'drop_rate:0.5': None}: refuse it, never drop it."""
    for k, v in value.items():
        if isinstance(k, str) and ":" in k and v is None:
            name, rest = k.split(":", 1)
            raise ConfigError(f"'{key}' in {source} has the key {shown(k)} with no value: YAML "
                              f"needs a space after ':' (write {{{shown_text(name)}: "
                              f"{shown_text(rest)}}})")
        if isinstance(v, dict):
            check_colon_keys(v, f"{key}.{k}", source)


_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.S)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_DEPTH_CHUNK = 1 << 20


def json_depth(text: str) -> int:
    """How deep the arrays and objects of JSON ``text`` nest, measured without parsing it
    (strings skipped, brackets counted; linear time, no recursion)."""
    marks = _NOT_BRACKET.sub("", _JSON_STRING.sub("", text))
    depth = peak = 0
    for start in range(0, len(marks), _DEPTH_CHUNK):
        codes = np.frombuffer(marks[start:start + _DEPTH_CHUNK].encode("ascii"), np.uint8)
        steps = (codes & 2).astype(np.int64) - 1  # '[' '{' have bit 1 set: +1; ']' '}': -1
        running = depth + np.cumsum(steps)
        peak, depth = max(peak, int(running.max())), int(running[-1])
    return peak


def loads_json(text: str | bytes, source: str, error: type[Exception],
               max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``json.loads(text)`` of metadata someone else may have written: nesting deeper than
    ``max_depth`` (which would raise RecursionError here or in whatever walks the result)
    and text that is not JSON are one ``error`` line."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise error(f"{source} is not UTF-8 text (byte offset {exc.start}); it was "
                        "altered or not written by transferlab") from None
    depth = json_depth(text)
    if depth > max_depth:
        raise error(f"{source} nests {depth:,} levels deep, more than the {max_depth} "
                    "metadata can need; it was altered or not written by transferlab")
    try:
        return json.loads(text)
    except RecursionError:  # pragma: no cover - the depth was measured above
        raise error(f"{source} nests too deeply to be metadata") from None
    except ValueError as exc:
        raise error(f"{source} is not JSON ({shown_text(str(exc))}); it was altered or "
                    "not written by transferlab") from None
