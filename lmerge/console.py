"""What the ``lmerge`` command prints: its own lines, progress bars and one-line errors (an
lmerge error, or jsonargparse's refusal of a flag in one line, with the closest valid flag). The
notes of the libraries below it (Lightning's tips, accelerator lines and model summary,
transformers' weight-load reports, warnings raised inside dependencies) appear only with
``--verbose``."""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings
from argparse import ArgumentError
from pathlib import Path
from typing import Any, TextIO

from lmerge.errors import ConfigError, LMergeError, did_you_mean

_library_show_warning = warnings.showwarning


def configure(verbose: bool) -> None:
    """Set up the console for one command: the libraries' INFO lines (Lightning's accelerators,
    tips and model summary, the seed), transformers' weight-load reports and warnings raised in
    dependencies only when ``verbose``; lmerge's own warnings in one line either way."""
    warnings.showwarning = _ShowWarning(verbose)
    # Process-wide, so it also holds for loggers that a library configures when it is imported
    # later (Lightning sets its own to INFO on import).
    logging.disable(logging.NOTSET if verbose else logging.INFO)
    level = "warning" if verbose else "error"
    if "transformers" in sys.modules:
        from transformers.utils import logging as transformers_logging

        transformers_logging.set_verbosity(getattr(transformers_logging, level.upper()))
    else:
        os.environ["TRANSFORMERS_VERBOSITY"] = level  # read when transformers sets up its logging


def is_ours(filename: str) -> bool:
    """Whether a warning was raised from lmerge's code (its file lies in the lmerge package)."""
    return "lmerge" in Path(filename).parts


class _ShowWarning:
    """``warnings.showwarning`` of a command: lmerge's own warnings in one line; the libraries'
    in their usual form when ``verbose``, else not at all."""

    def __init__(self, verbose: bool) -> None:
        self.verbose = verbose

    def __call__(
        self,
        message: Warning | str,
        category: type[Warning],
        filename: str,
        lineno: int,
        file: TextIO | None = None,
        line: Any = None,
    ) -> None:
        if is_ours(filename):
            print(f"lmerge: {category.__name__}: {message}", file=sys.stderr)
        elif self.verbose:
            _library_show_warning(message, category, filename, lineno, file, line)


# ---- one-line errors ---------------------------------------------------------------------------
def lmerge_cause(exc: BaseException) -> LMergeError | None:
    """The LMergeError that ``exc`` was raised from, if any."""
    seen = set()
    while exc is not None and not isinstance(exc, LMergeError) and id(exc) not in seen:
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return exc if isinstance(exc, LMergeError) else None


def with_flag_hint(error: ArgumentError, keys: list[str]) -> ConfigError | None:
    """jsonargparse's refusal of an unknown flag, with the verb's closest flag suggested; None
    for other refusals."""
    message = _one_line(str(_unrelayed(error)))
    if not message.startswith(_UNRECOGNIZED):
        return None
    flag = next((word for word in message.split() if word.startswith("--")), "")
    hint = did_you_mean(flag.partition("=")[0], [f"--{key}" for key in keys])
    return ConfigError(message + hint)


# jsonargparse 4.53 names the key it refuses and the kind of a refusal in its messages only: an
# ArgumentError(None, message), raised from a TypeError 'Parser key "<key>"...'. These three
# wordings are all that is read from its text; the rest follows the exceptions it chains.
_KEY_WORDING = 'Parser key "'
_UNION_WORDING = "Does not validate against any of the Union subtypes"
_UNRECOGNIZED = "unrecognized arguments:"
_BOOLEAN_FOR_TEXT = re.compile(r"Expected a <class 'str'>\. Got value: (True|False)\b")


def argument_message(error: ArgumentError) -> str:
    """jsonargparse's refusal on one line. A single complaint reads as jsonargparse words it; a
    value that fits none of a union's types (``X | None``) reads ``key: <what>`` with the
    complaint about X: jsonargparse raises its report on every type from that one (None last)."""
    refusal = _unrelayed(error)
    report = refusal.__cause__
    if report is not None and report.__cause__ is not None and _is_union_report(report):
        message = f"{_key(refusal)}: {_complaint(report.__cause__)}"
    else:
        message = _one_line(str(refusal))
    if _BOOLEAN_FOR_TEXT.search(message):
        # A task named yes or no, or a tag on: YAML 1.1 made it a boolean before jsonargparse saw it.
        message += " (YAML reads an unquoted yes, no, on, off, true or false as a boolean: quote it, e.g. '\"yes\"')"
    return message


def _complaint(exc: BaseException) -> str:
    """One link of jsonargparse's chain and those under it: a key's refusal as ``key: ...``, a
    union's report as its first type's complaint, any other wrapper as its first line and its cause."""
    exc = _unrelayed(exc)
    cause = exc.__cause__
    if cause is None:
        return _one_line(str(exc))
    if _is_union_report(exc):
        return _complaint(cause)
    if str(exc).startswith(_KEY_WORDING):
        return f"{_key(exc)}: {_complaint(cause)}"
    return f"{str(exc).splitlines()[0]} {_complaint(cause)}"


def _unrelayed(exc: BaseException) -> BaseException:
    """``exc``, or the exception it relays: each nested parser (a verb, a class_path's arguments)
    raises its own ArgumentError from the one below, with the same message."""
    while exc.__cause__ is not None and str(exc.__cause__) == str(exc):
        exc = exc.__cause__
    return exc


def _is_union_report(exc: BaseException) -> bool:
    return str(exc).startswith(_UNION_WORDING)


def _key(refusal: BaseException) -> str:
    """The key a refusal names: ``save.rank`` of 'Parser key "save.rank": ...'."""
    return str(refusal).removeprefix(_KEY_WORDING).partition('"')[0]


def _one_line(text: str) -> str:
    return " ".join(text.split())
