"""Configs: one merge (base files ⊕ recipe file ⊕ command line), checked against the defaults.

Configs are mmengine Python configs with ``_base_`` inheritance. The files in
``configs/_base_/`` are the complete list of settings with their defaults, so they double as the
schema: a key that no base file defines is a typo, and a value whose type differs from the
default's is a mistake. Both fail before any work, naming the key and the file that set it.
Top-level names that are not sections are the config file's helper variables: they are dropped
(:func:`_helpers_dropped`), unless a dict that resembles a section's name. A setting whose
default is None or ``dict()`` is free-form (``dict()`` lets a recipe give a dict, which mmengine
refuses to merge over a None).
"""

from __future__ import annotations

import ast
import difflib
import re
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

CONFIG_ROOT = Path(__file__).resolve().parents[1] / "configs"
BASE_DIR = CONFIG_ROOT / "_base_"
CLI_SOURCE = "--cfg-options"


class ConfigError(ValueError):
    """A config names an unknown key, gives a value of the wrong type, or cannot be read."""


def load_config(path: Path | str, cfg_options: Mapping[str, Any] | Sequence[str] | None = None) -> dict:
    """Read, merge and validate a config; returns a plain nested dict.

    ``cfg_options`` is either a mapping of dotted keys to values or a list of ``key=value``
    strings as typed on the command line (values parsed as Python literals when possible).
    """
    from mmengine.config import Config

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        cfg = Config.fromfile(str(path))
    except Exception as err:  # mmengine raises many kinds; all mean "this file is broken"
        raise ConfigError(f"could not read config {path}: {err}") from err
    options = parse_options(cfg_options)
    merged = _helpers_dropped(_plain(cfg.to_dict()))
    for key, value in options.items():
        # set, not merge: a dict on the command line replaces the setting whole, whatever it was
        node = merged
        *parents, leaf = key.split(".")
        for part in parents:
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child
        node[leaf] = _plain(value)
    validate(merged, path, set(options))
    return merged


def _helpers_dropped(cfg: dict[str, Any]) -> dict[str, Any]:
    """The config without its helper variables. A config file may define top-level names of its own
    (``TEACHER = 'work/teacher.pth'``, then ``teacher = dict(checkpoint=TEACHER)``), as mmengine
    allows; only the sections are settings. A top-level dict that resembles a section name
    (``minig = dict(k=3)``) is a typo, not a helper: it stays, and validation names it."""
    sections = schema()
    out = {}
    for key, value in cfg.items():
        if key in sections or (isinstance(value, Mapping) and difflib.get_close_matches(key, list(sections), n=1)):
            out[key] = value
    return out


def parse_options(cfg_options: Mapping[str, Any] | Sequence[str] | None) -> dict[str, Any]:
    if not cfg_options:
        return {}
    if isinstance(cfg_options, Mapping):
        return dict(cfg_options)
    out: dict[str, Any] = {}
    for item in cfg_options:
        if "=" not in item:
            raise ConfigError(f"{CLI_SOURCE}: expected key=value, got {item!r}")
        key, raw = item.split("=", 1)
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        out[key.strip()] = value
    return out


@lru_cache(maxsize=1)
def schema() -> dict[str, Any]:
    """Every known setting with its default: the merge of all files in ``configs/_base_/``."""
    from mmengine.config import Config

    merged: dict[str, Any] = {}
    for f in sorted(BASE_DIR.glob("*.py")):
        for key, value in _plain(Config.fromfile(str(f)).to_dict()).items():
            if key in merged:
                raise ConfigError(f"section {key!r} is defined by two base files; {f} is the second")
            merged[key] = value
    return merged


def validate(cfg: Mapping[str, Any], path: Path, cli_keys: set[str] = frozenset()) -> None:
    errors = []
    for key, value, default, known in _walk(cfg, schema()):
        if not known:
            errors.append(f"unknown key '{key}'{_suggest(key)}")
        elif not _type_ok(value, default):
            errors.append(
                f"key '{key}' should be {_type_name(default)} (default {default!r}), "
                f"got {type(value).__name__} {value!r}"
            )
        else:
            continue
        errors[-1] += f" — set in {_where(key, path, cli_keys)}"
    if not errors:
        try:
            max_pixels(cfg)
        except ConfigError as err:
            errors.append(f"{err} — set in {_where('data.max_pixels', path, cli_keys)}")
    if errors:
        raise ConfigError(f"invalid config {path}:\n  " + "\n  ".join(errors))


def max_pixels(cfg: Mapping[str, Any]) -> int:
    """``data.max_pixels``: the largest image, in pixels, that any stage decodes (the default when unset)."""
    from partdistill.data.images import DEFAULT_MAX_PIXELS

    value = (cfg.get("data") or {}).get("max_pixels", DEFAULT_MAX_PIXELS)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"data.max_pixels must be a positive int (a number of pixels), got {value!r}")
    return value


def section(cfg: Mapping[str, Any], name: str) -> dict[str, Any]:
    if name not in cfg:
        raise ConfigError(f"config has no section '{name}'")
    return dict(cfg[name])


# --- helpers ---------------------------------------------------------------------------------


def _plain(obj: Any) -> Any:
    """ConfigDict/tuple → dict/list, so configs hash and serialise the same everywhere."""
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items() if not str(k).startswith("_")}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def _walk(cfg: Mapping[str, Any], ref: Mapping[str, Any] | None, prefix: str = ""):
    for key, value in cfg.items():
        dotted = f"{prefix}{key}"
        if ref is None:  # inside a free-form setting (default None): anything goes
            continue
        if key not in ref:
            yield dotted, value, None, False
            continue
        default = ref[key]
        if isinstance(default, Mapping) and not default:
            continue  # a free-form setting whose default is dict(): a value, or a dict of them
        if isinstance(value, Mapping) and isinstance(default, Mapping):
            yield from _walk(value, default, dotted + ".")
        elif isinstance(value, Mapping) and default is None:
            continue
        else:
            yield dotted, value, default, True


def _type_ok(value: Any, default: Any) -> bool:
    if default is None or value is None:
        return True
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, (list, tuple)):
        return isinstance(value, (list, tuple))
    if isinstance(default, Mapping):
        return isinstance(value, Mapping)
    return isinstance(value, type(default))


def _type_name(default: Any) -> str:
    return {bool: "a bool", int: "an int", float: "a number", str: "a string",
            list: "a list", dict: "a dict"}.get(type(default), type(default).__name__)


def _suggest(dotted: str) -> str:
    parent, _, leaf = dotted.rpartition(".")
    node: Any = schema()
    for part in parent.split(".") if parent else []:
        node = node.get(part, {}) if isinstance(node, Mapping) else {}
    candidates = list(node) if isinstance(node, Mapping) else []
    close = difflib.get_close_matches(leaf, candidates, n=1)
    return f" (did you mean '{parent + '.' if parent else ''}{close[0]}'?)" if close else ""


def _where(dotted: str, path: Path, cli_keys: set[str]) -> str:
    """The file (leaf first, then its bases) whose text sets the key's last component."""
    if any(dotted == k or dotted.startswith(k + ".") for k in cli_keys):
        return CLI_SOURCE
    leaf = re.escape(dotted.rsplit(".", 1)[-1])
    pattern = re.compile(rf"(\b{leaf}\s*=|['\"]{leaf}['\"]\s*:)")
    for f in _chain(path):
        if pattern.search(f.read_text()):
            return str(f)
    return str(path)


def _chain(path: Path) -> list[Path]:
    """The config file and, depth first, the files its ``_base_`` names."""
    out, todo = [], [path.resolve()]
    while todo:
        f = todo.pop(0)
        if f in out or not f.is_file():
            continue
        out.append(f)
        try:
            tree = ast.parse(f.read_text())
        except SyntaxError:
            continue
        for node in tree.body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "_base_" for t in node.targets):
                try:
                    bases = ast.literal_eval(node.value)
                except ValueError:
                    continue
                for b in [bases] if isinstance(bases, str) else bases:
                    todo.append((f.parent / b).resolve())
    return out
