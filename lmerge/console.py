"""What the ``lmerge`` command prints: its own lines, progress bars and one-line errors. The notes
of the libraries below it (Lightning's tips, accelerator lines and model summary, transformers'
weight-load reports, warnings raised inside dependencies) appear only with ``--verbose``."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any, TextIO

_library_show_warning = warnings.showwarning


def configure(verbose: bool) -> None:
    """Set up the console for one command: the libraries' INFO lines (Lightning's accelerators,
    tips and model summary, the seed), transformers' weight-load reports and warnings raised in
    dependencies only when ``verbose``; lmerge's own warnings in one line either way."""
    warnings.showwarning = _show_warning_verbose if verbose else _show_warning
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


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: Any = None,
) -> None:
    # Our own warnings in one line; the libraries' only with --verbose.
    if is_ours(filename):
        print(f"lmerge: {category.__name__}: {message}", file=sys.stderr)


def _show_warning_verbose(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: Any = None,
) -> None:
    if is_ours(filename):
        print(f"lmerge: {category.__name__}: {message}", file=sys.stderr)
    else:
        _library_show_warning(message, category, filename, lineno, file, line)
