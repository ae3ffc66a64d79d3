"""Tasks: the catalog file, task specs, the task-kind registry, the models each kind loads, and
resolving adapter names through the catalog."""
