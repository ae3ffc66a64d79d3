"""``lmerge demo``: the built-in benchmark, built from PyPI-shipped data, with every method run on it."""

from lmerge.demo.command import demo

__all__ = ["demo"]
