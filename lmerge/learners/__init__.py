"""LightningModules that learn merge coefficients over fused LoRA models, and LoraFinetune."""

from lmerge.learners.adamerging import AdaMerging
from lmerge.learners.base import MergeLearner
from lmerge.learners.finetune import LoraFinetune
from lmerge.learners.gradient import GradientCE
from lmerge.learners.regret import RegretSmoothMax
from lmerge.learners.supermerge import SuperMerge

# The names a merge config's ``optimizer`` key uses for each learner.
LEARNERS = {
    "adamerging": AdaMerging,
    "gradient": GradientCE,
    "supermerge": SuperMerge,
    "regret_smoothmax": RegretSmoothMax,
}

__all__ = ["LEARNERS", "AdaMerging", "GradientCE", "LoraFinetune", "MergeLearner", "RegretSmoothMax", "SuperMerge"]
