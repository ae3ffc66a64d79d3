"""The static merge: ``MergeConfig``, the per-module engine, lambda policies, transforms, the
writers (exact LoRA, SVD LoRA, full weights) and the runner that ties them into a run bundle."""
