"""Tasks: the catalog file, task specs, the task-kind registry (``kinds/``: one file per kind),
the models each kind loads, and resolving adapter names through the catalog."""
