"""Evaluation: per-task metrics of a merge, the single-task baselines and interference deltas.

``evaluate.Evaluator`` runs it; ``metrics`` is the metric registry (imported by task specs,
so this package imports nothing eagerly).
"""
