"""The task catalog: a YAML file mapping task names to their adapter (and, later, their data).

```yaml
tasks:
  sentiment:
    adapter: adapters/sentiment   # relative to this file
  question: adapters/question     # shorthand: the adapter path alone
```
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from lmerge.errors import ConfigError


def load_catalog(path: str | Path) -> dict[str, dict[str, Any]]:
    """Task name -> entry (a mapping with at least ``adapter``, made absolute)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"catalog {path}: file does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"catalog {path}: malformed YAML ({_first_line(exc)})") from None
    tasks = data.get("tasks") if isinstance(data, dict) else None
    if not isinstance(tasks, dict):
        raise ConfigError(f"catalog {path}: expected a mapping under 'tasks'")
    entries: dict[str, dict[str, Any]] = {}
    for name, entry in tasks.items():
        if isinstance(entry, str):
            entry = {"adapter": entry}
        if not isinstance(entry, dict) or not isinstance(entry.get("adapter"), str):
            raise ConfigError(f"catalog {path}: tasks.{name}.adapter must be a path")
        entries[str(name)] = {**entry, "adapter": str((path.parent / entry["adapter"]).resolve())}
    return entries


def _first_line(exc: Exception) -> str:
    return " ".join(str(exc).split())
