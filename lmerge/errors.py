"""Errors that the command line turns into one clear line and exit code 2."""

from __future__ import annotations


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


def unknown_name(kind: str, name: object, valid: list[str]) -> str:
    """Message for a name that a registry does not hold, listing the valid ones."""
    return f"unknown {kind} {name!r}; valid: {', '.join(sorted(valid))}"
