"""Settings in plain words: what is wrong with them (one line per problem, naming the one source
of the bad value) and what is in force (secrets masked).

Both read the models' keys and field names only, so a section added to `Settings` is covered.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from ccm.errors import ConfigError
from ccm.yamlfile import KeyPath, dotted


class SettingsInvalid(ConfigError):
    """One or more settings are wrong; `problems` holds one line each (`ccm config check` prints
    them all), the message is the first of them."""

    def __init__(self, problems: list[str]) -> None:
        more = len(problems) - 1
        tail = f" (and {more} more: `ccm config check` lists them all)" if more else ""
        super().__init__(problems[0] + tail)
        self.problems = problems


@dataclass
class Origins:
    """Where each key's value came from (`config/ccm.yaml, line 3`, `environment variable
    CCM_SERVER_PORT`, `command line`), so an error names one source: the one holding the value."""

    by_path: dict[KeyPath, str] = field(default_factory=dict)
    default: str = "the defaults"

    def set(self, path: KeyPath, origin: str) -> None:
        self.by_path[path] = origin

    def _known(self, path: tuple[str | int, ...]) -> KeyPath | None:
        keys = tuple(str(p) for p in path)
        for n in range(len(keys), 0, -1):
            if keys[:n] in self.by_path:
                return keys[:n]
        return None

    def of(self, path: tuple[str | int, ...]) -> str:
        known = self._known(path)
        return self.by_path[known] if known is not None else self.default

    def rank(self, path: tuple[str | int, ...]) -> int:
        """Problems are listed in the order their values were read (file lines, then env)."""
        known = self._known(path)
        return list(self.by_path).index(known) if known is not None else len(self.by_path)


def suggest(path: KeyPath, keys: Mapping[KeyPath, bool]) -> str:
    """`; did you mean 'server.port'?` for an unknown key path, or an empty string."""
    parent, name = path[:-1], path[-1]
    siblings = [p[-1] for p in keys if p[:-1] == parent]
    close = difflib.get_close_matches(name, siblings, n=1, cutoff=0.6)
    if close:
        return f"; did you mean '{dotted((*parent, close[0]))}'?"
    # The right name in the wrong place: `port:` at the top instead of under `server:`.
    elsewhere = sorted(dotted(p) for p in keys if p[-1] == name and p != path)
    if elsewhere:
        return "; did you mean " + " or ".join(f"'{p}'" for p in elsewhere) + "?"
    return ""


def shown(value: object) -> str:
    """A value as the operator wrote it: 'text', 7, [1, 2], nothing."""
    if value is None:
        return "nothing"
    if isinstance(value, str):
        return repr(value)
    try:
        return json.dumps(value, default=str)
    except (TypeError, ValueError):
        return repr(value)


_BOUNDS = {
    "greater_than_equal": ("at least", "ge"),
    "greater_than": ("more than", "gt"),
    "less_than_equal": ("at most", "le"),
    "less_than": ("less than", "lt"),
}


def _problem(error: Mapping[str, Any]) -> str:
    """Pydantic's error as a plain sentence about the value."""
    kind = error["type"]
    given = shown(error.get("input"))
    ctx = error.get("ctx") or {}
    if kind == "value_error" and "error" in ctx:
        return str(ctx["error"])
    if kind in {"int_parsing", "int_type", "int_from_float"}:
        return f"must be a whole number, not {given}"
    if kind in {"float_parsing", "float_type"}:
        return f"must be a number, not {given}"
    if kind in {"bool_parsing", "bool_type"}:
        return f"must be true or false, not {given}"
    if kind in {"string_type", "str_type"}:
        return f"must be text, not {given}"
    if kind == "list_type":
        return f"must be a list such as [a, b], not {given}"
    if kind in {"model_type", "dict_type", "model_attributes_type"}:
        return f"must be a mapping of keys (indented `key: value` lines), not {given}"
    if kind in {"enum", "literal_error"}:
        return f"must be one of {ctx.get('expected', '?')}, not {given}"
    if kind in _BOUNDS:
        words, name = _BOUNDS[kind]
        return f"must be {words} {ctx.get(name)}, not {given}"
    if kind in {"path_type", "path_parsing"}:
        return f"must be a file path, not {given}"
    message = str(error.get("msg", kind))
    return f"{message[:1].lower()}{message[1:]} (given {given})"


def blank_strings(data: object, path: KeyPath = ()) -> Iterator[KeyPath]:
    """Key paths whose value is empty text: refused, never replaced by the default."""
    if isinstance(data, Mapping):
        for key, value in data.items():
            yield from blank_strings(value, (*path, str(key)))
    elif isinstance(data, list):
        if any(isinstance(v, str) and not v.strip() for v in data):
            yield path
    elif isinstance(data, str) and not data.strip():
        yield path


def problems_of(
    exc: ValidationError,
    origins: Origins,
    keys: Mapping[KeyPath, bool],
    *,
    skip: list[KeyPath] | None = None,
) -> list[str]:
    """One line per error: `<source>: <key> <what is wrong, what to write>`; errors at the
    paths in `skip` (already reported) are left out."""
    problems = []
    for error in sorted(exc.errors(), key=lambda e: origins.rank(tuple(e["loc"]))):
        loc = tuple(error["loc"])
        keys_of_loc = tuple(str(p) for p in loc)
        if any(keys_of_loc[: len(done)] == done for done in skip or []):
            continue
        if error["type"] == "extra_forbidden":
            path = tuple(str(p) for p in loc)
            problems.append(f"{origins.of(loc)}: unknown key '{dotted(loc)}'{suggest(path, keys)}")
        else:
            problems.append(f"{origins.of(loc)}: {dotted(loc)} {_problem(error)}")
    return problems


NOT_SETTINGS = ("CCM_CONFIG",)
"""`CCM_*` variables ccm reads that are not keys."""
TEST_PREFIXES = ("CCM_TEST_", "CCM_REQUIRE_", "CCM_RELIABILITY_", "CCM_BENCH_")
"""Variables of the test suite and the benchmarks, never read by ccm itself."""


def unknown_variables(environ: Mapping[str, str], settings: Iterable[str]) -> list[str]:
    """`CCM_*` variables that are not settings, so a typo (`CCM_SERVER_PROT`) cannot silently
    leave the default in force; one line each, with the closest variable that is one."""
    known = [*settings, *NOT_SETTINGS]
    problems = []
    for var in sorted(environ):
        if not var.startswith("CCM_") or var in known or var.startswith(TEST_PREFIXES):
            continue
        close = difflib.get_close_matches(var, known, n=1, cutoff=0.75)
        hint = f"did you mean {close[0]}?" if close else "config/ccm.yaml lists the keys"
        problems.append(f"environment variable {var} is not a ccm setting: {hint} (or unset it)")
    return problems


# -- what is in force --------------------------------------------------------------------------

_SECRET_WORDS = ("key", "password", "secret", "token")
_NOT_SECRET = {"require_api_key"}
_UNITS_MS = {"d": 86_400_000, "h": 3_600_000, "m": 60_000, "s": 1000}


def mask_url(url: str) -> str:
    """A database URL with its password replaced by `***` (also when it does not parse)."""
    return re.sub(r"(://[^/@:]*:)[^/@]*@", r"\1***@", url)


def format_duration(value: timedelta) -> str:
    """`7d`, `90s`, `1500ms`: the largest unit that divides the duration, as settings write it."""
    ms = round(value.total_seconds() * 1000)
    for unit, size in _UNITS_MS.items():  # days, not weeks: 7d reads better than 1w
        if ms and ms % size == 0:
            return f"{ms // size}{unit}"
    return f"{ms}ms"


def masked(name: str, value: Any, fingerprint: Callable[[str], str]) -> Any:
    """A value as `ccm config check` shows it: secrets (found by name: `*key*`, `*password*`,
    `*secret*`, `*token*`) as `*** (fingerprint)`, the password of a `url` as `***`."""
    if name == "url" and isinstance(value, str):
        return mask_url(value)
    if name in _NOT_SECRET or not any(word in name for word in _SECRET_WORDS):
        return value
    if isinstance(value, list):
        return [f"*** ({fingerprint(str(v))})" for v in value]
    if isinstance(value, str):
        return f"*** ({fingerprint(value)})"
    return value


def effective_settings(settings: BaseModel, fingerprint: Callable[[str], str]) -> dict[str, Any]:
    """The settings as JSON-ready data, written as a file would write them (`7d`, not seconds),
    secrets as `*** (fingerprint)` and passwords in URLs as `***`. Secrets are found by name
    (`*key*`, `*password*`, `*secret*`, `*token*`; `url`), so a new section needs no code here."""

    def walk(node: Any, name: str) -> Any:
        if isinstance(node, dict):
            return {k: walk(v, k) for k, v in node.items()}
        if isinstance(node, timedelta):
            return format_duration(node)
        if isinstance(node, StrEnum):
            return node.value
        if isinstance(node, Path):
            return str(node)
        return masked(name, node, fingerprint)

    result: dict[str, Any] = walk(settings.model_dump(), "")
    database_url = getattr(settings, "database_url", None)  # Settings' property: the URL in use
    if isinstance(database_url, str):
        result["database_url"] = mask_url(database_url)
    return result
