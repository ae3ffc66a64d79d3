"""lmerge."""
