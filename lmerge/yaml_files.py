"""Reading YAML files that users hand to lmerge (configs, catalogs), with one-line errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from lmerge.errors import ConfigError


def read_yaml(path: str | Path, what: str = "config file") -> dict[str, Any]:
    """A YAML mapping from ``path``; malformed or non-mapping files name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: {what} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "parse error"
        raise ConfigError(f"{path}:{where}: malformed YAML ({problem})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys, got {type(data).__name__}")
    return data
