"""The learners by the class path configs name them with (``lmerge.learners.AdaMerging``); they
live in :mod:`lmerge.learn`."""

from lmerge.learn.adamerging import AdaMerging
from lmerge.learn.base import MergeLearner
from lmerge.learn.finetune import LoraFinetune
from lmerge.learn.from_config import LEARNERS
from lmerge.learn.gradient import GradientCE
from lmerge.learn.regret import RegretSmoothMax
from lmerge.learn.supermerge import SuperMerge

__all__ = ["LEARNERS", "AdaMerging", "GradientCE", "LoraFinetune", "MergeLearner", "RegretSmoothMax", "SuperMerge"]
