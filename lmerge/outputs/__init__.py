"""Where lmerge writes, and the one way it writes: output paths, run bundles, atomic writes and
the eval index, each checked to stay inside the output root.

A ground-floor package: merging, saving, evaluation and sweeps write through it, and it imports
none of them. :func:`inside_root` is the one path check; every write, rename and delete here
passes its target through it (symlinks resolved), so nothing a config, a catalog, a run's metadata
or a shared sweep storage names can steer a write outside the root. A run bundle is built in a
hidden staging folder and appears, with its index entry, in one step (:mod:`.bundles`).
"""

from lmerge.outputs.bundles import Staged, run_bundle, staged_dir
from lmerge.outputs.files import (
    file_lock,
    link_atomic,
    make_dirs,
    open_lock_file,
    os_error_line,
    remove_file,
    remove_tree,
    removed_if_left_empty,
    rename,
    write_bytes_atomic,
    write_json_atomic,
)
from lmerge.outputs.index import append_index, check_index, index_lock, read_index
from lmerge.outputs.paths import (
    DEFAULT_OUTPUT_DIR,
    check_folder,
    check_inputs_outside,
    check_output_root,
    eval_dir,
    index_path,
    inside_root,
    merged_dir,
    new_run_dir,
    safe_component,
    single_metrics_path,
    subsets_dir,
    task_combo,
    task_eval_dir,
    task_metrics_link,
)

__all__ = [
    "DEFAULT_OUTPUT_DIR",
    "Staged",
    "append_index",
    "check_folder",
    "check_index",
    "check_inputs_outside",
    "check_output_root",
    "eval_dir",
    "file_lock",
    "index_lock",
    "index_path",
    "inside_root",
    "link_atomic",
    "make_dirs",
    "merged_dir",
    "new_run_dir",
    "open_lock_file",
    "os_error_line",
    "read_index",
    "remove_file",
    "remove_tree",
    "removed_if_left_empty",
    "rename",
    "run_bundle",
    "safe_component",
    "single_metrics_path",
    "staged_dir",
    "subsets_dir",
    "task_combo",
    "task_eval_dir",
    "task_metrics_link",
    "write_bytes_atomic",
    "write_json_atomic",
]
