"""Config files as text and YAML, with errors that name the file and the line where the mistake is.

Used for the settings file and the device config file alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from ccm.errors import ConfigError

KeyPath = tuple[str, ...]


def dotted(path: tuple[str | int, ...]) -> str:
    """`server.port`, `server.allowed_hosts[0]`."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text


@dataclass(frozen=True)
class YamlDocument:
    """A parsed YAML file and the line of each key, for errors that name the line."""

    path: Path
    data: object
    lines: dict[KeyPath, int]
    """Key path -> 1-based line of the key."""
    empty: frozenset[KeyPath]
    """Keys written with nothing after the colon (`url:`), as opposed to `url: null`."""

    def where(self, key: tuple[str | int, ...]) -> str:
        """`config/ccm.yaml, line 12` for the key (or its nearest parent with a line)."""
        parts = tuple(str(p) for p in key)
        for n in range(len(parts), 0, -1):
            if parts[:n] in self.lines:
                return f"{self.path}, line {self.lines[parts[:n]]}"
        return str(self.path)


def _syntax_error(exc: yaml.MarkedYAMLError, text: str, path: Path) -> ConfigError:
    """A syntax error at the line where it is, which is often not the line the parser stopped
    at: an unclosed bracket or quote is reported where the next key starts or the file ends,
    and a key without its colon where the next line begins."""
    problem = exc.problem or "not valid YAML"
    mark, context = exc.problem_mark, exc.context_mark
    line = mark.line + 1 if mark else None
    if context is not None and mark is not None and context.line < mark.line:
        what = None
        if "flow sequence" in (exc.context or ""):
            what = "'[' is never closed"
        elif "flow mapping" in (exc.context or ""):
            what = "'{' is never closed"
        elif "quoted scalar" in (exc.context or ""):
            what = "a quote is never closed"
        if what:
            return ConfigError(f"{path}, line {context.line + 1}: {what}")
    if mark is not None and "mapping values are not allowed" in problem:
        lines = text.splitlines()
        before = [
            n
            for n in range(mark.line - 1, -1, -1)
            if lines[n].strip() and not lines[n].lstrip().startswith("#")
        ]
        if before:
            previous = lines[before[0]]
            if ":" not in previous and not previous.lstrip().startswith("-"):
                return ConfigError(
                    f"{path}, line {before[0] + 1}: '{previous.strip()}' has no ':' after its key"
                )
        return ConfigError(f"{path}, line {line}: a value holding ': ' must be in quotes")
    if "'\\t'" in problem:
        return ConfigError(f"{path}, line {line}: a tab indents this line; YAML needs spaces")
    return ConfigError(f"{path}, line {line}: {problem}" if line else f"{path}: {problem}")


def _walk(
    node: yaml.Node,
    path: KeyPath,
    lines: dict[KeyPath, int],
    empty: set[KeyPath],
    file: Path,
) -> None:
    if not isinstance(node, yaml.MappingNode):
        return
    for key_node, value_node in node.value:
        if not isinstance(key_node, yaml.ScalarNode):
            continue
        key = (*path, str(key_node.value))
        line = key_node.start_mark.line + 1
        if key in lines:
            raise ConfigError(
                f"{file}, line {line}: '{dotted(key)}' is already set on line {lines[key]}"
            )
        lines[key] = line
        if (
            isinstance(value_node, yaml.ScalarNode)
            and value_node.tag == "tag:yaml.org,2002:null"
            and value_node.value == ""
        ):
            empty.add(key)
        _walk(value_node, key, lines, empty, file)


def read_yaml(text: str, path: Path) -> YamlDocument:
    """YAML to Python with each key's line. A syntax error, or a key set twice (YAML would keep
    the last silently), is a ConfigError naming the file and the line."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        raise _syntax_error(exc, text, path) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    lines: dict[KeyPath, int] = {}
    empty: set[KeyPath] = set()
    if node is not None:
        _walk(node, (), lines, empty, path)
    return YamlDocument(path, data, lines, frozenset(empty))


def parse_yaml(text: str, path: Path) -> object:
    """YAML to Python; errors name the file and line (see `read_yaml`)."""
    return read_yaml(text, path).data


def read_text(path: Path, what: str) -> str:
    """A config file's text; a missing, unreadable or non-UTF-8 file is a ConfigError."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"{what} {path} is a directory, not a file") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{what} {path} is not UTF-8 text: {exc.reason}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from None
