"""Turn the config's ``adapters`` list (paths or task names) into loaded adapters."""

from __future__ import annotations

from pathlib import Path

from lmerge.adapters.lora import LoraAdapter
from lmerge.errors import AdapterError, ConfigError, did_you_mean
from lmerge.outputs import safe_component
from lmerge.tasks.catalog import load_catalog


def resolve_adapters(specs: list[str], catalog: str | Path | None = None) -> list[LoraAdapter]:
    """Load each adapter named by a directory path or by a task name in the catalog.

    A task name gives the adapter that name; a path gives it the directory's name.
    """
    if not specs:
        raise ConfigError("adapters: the list is empty; name at least one adapter path or task")
    entries = load_catalog(catalog) if catalog else {}
    adapters: list[LoraAdapter] = []
    seen: dict[Path, str] = {}
    for spec in specs:
        path, name = _locate(str(spec), entries, catalog)
        real = path.resolve()
        if real in seen:
            raise ConfigError(f"adapters: {spec!r} is the same adapter as {seen[real]!r}")
        seen[real] = str(spec)
        adapters.append(LoraAdapter(path, name=safe_component(name, what="adapter name")))
    names = [adapter.name for adapter in adapters]
    clash = next((name for name in names if names.count(name) > 1), None)
    if clash:
        raise ConfigError(f"adapters: two adapters are named {clash!r}; use task names from a catalog")
    return adapters


def _locate(spec: str, entries: dict, catalog: str | Path | None) -> tuple[Path, str]:
    if spec in entries:
        return Path(entries[spec]["adapter"]), spec
    path = Path(spec)
    if path.is_dir():
        return path, path.resolve().name
    if "/" in spec or path.suffix:
        raise AdapterError(f"{spec}: adapter directory does not exist")
    where = f"catalog {catalog}" if catalog else "no catalog given (--catalog)"
    known = f"; known tasks: {', '.join(sorted(entries))}" if entries else ""
    raise ConfigError(
        f"adapters: {spec!r} is neither a directory nor a task in {where}{did_you_mean(spec, entries)}{known}"
    )
