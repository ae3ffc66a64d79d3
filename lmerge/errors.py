"""Errors that the command line turns into one clear line and exit code 2."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class LMergeError(Exception):
    """Base class: a user-facing problem with input, configuration or outputs."""


class ConfigError(LMergeError):
    """A config file, key or value is wrong."""


class AdapterError(LMergeError):
    """An adapter directory cannot be loaded or merged correctly."""


class MethodError(LMergeError):
    """An unknown method or transform, or bad method parameters."""


class OutputError(LMergeError):
    """Outputs cannot be written where asked."""


def unknown_name(kind: str, name: object, valid: Iterable[str]) -> str:
    """Message for a name that a registry does not hold: the closest valid name when one is
    close (``did you mean 'ties'?``), then every valid one."""
    valid = sorted(str(v) for v in valid)
    close = closest(name, valid)
    hint = f"did you mean {close!r}? " if close else ""
    return f"unknown {kind} {name!r}; {hint}valid: {', '.join(valid)}"


def did_you_mean(name: object, valid: Iterable[str]) -> str:
    """``"; did you mean 'x'?"`` for the valid name closest to a misspelt ``name``, else ``""``."""
    close = closest(name, valid)
    return f"; did you mean {close!r}?" if close else ""


def closest(name: object, valid: Iterable[str]) -> str | None:
    """The valid name most like ``name`` (difflib's ratio at least 0.6), if any."""
    close = difflib.get_close_matches(str(name), [str(v) for v in valid], n=1, cutoff=0.6)
    return close[0] if close else None
