"""The Optuna study behind a sweep: storage, handing out points to one or several workers,
and taking back the points of workers that died.

Points are claimed from the study's queue (Optuna pops a queued trial for one worker only), and
every claim happens under a lock file in the sweep directory, so a bayes budget is never
overrun by two workers at once. A worker holds an exclusive ``flock`` on its own file for as
long as it lives; a running trial whose worker's lock can be taken belongs to a dead process
(killed, crashed): it is marked failed and its point queued again, exactly once, since that
happens under the lock too.
"""

from __future__ import annotations

import fcntl
import os
import re
import socket
import uuid
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, Trial, TrialState
from sqlalchemy.exc import SQLAlchemyError

from lmerge.errors import ConfigError
from lmerge.outputs import file_lock, inside_root, make_dirs, open_lock_file, remove_file, safe_component
from lmerge.sweep.space import Space

WORKER_ATTR = "lmerge_worker"
POINT_ATTR = "lmerge_point"
WARM_ATTR = "lmerge_warm_start"
REPEAT_ATTR = "lmerge_repeat_of"
_ACTIVE = (TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING)
# host@pid@token: what a worker id must look like before it becomes part of a lock file's name (the
# ids come from the shared storage, which another process or a person may have written).
_WORKER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*@\d+@[0-9a-f]{8}$")
_HOST = re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname()).lstrip(".-") or "host"

# Optuna's own notes (a missing optional package, each finished trial) would drown the sweep's output.
optuna.logging.set_verbosity(optuna.logging.ERROR)


class Worker:
    """This process's liveness token: an exclusive lock on ``<directory>/<id>.lock`` (inside the
    output root ``root``), released by the operating system when the process ends, however it ends."""

    def __init__(self, directory: Path, root: str | Path) -> None:
        self.id = f"{_HOST}@{os.getpid()}@{uuid.uuid4().hex[:8]}"
        self.directory = directory
        self.root = root
        self._path = self._lock_path(self.id)
        self._fd = open_lock_file(self._path, root=root)
        fcntl.flock(self._fd, fcntl.LOCK_EX)

    def _lock_path(self, worker_id: str) -> Path:
        if not isinstance(worker_id, str) or not _WORKER_ID.match(worker_id):
            raise ConfigError(
                f"sweep storage: a trial names the worker {worker_id!r}, not an lmerge worker id "
                "(host@pid@token); the storage was changed by something other than lmerge"
            )
        return inside_root(self.root, self.directory / f"{worker_id}.lock")

    def alive(self, worker_id: str) -> bool:
        """Whether the worker ``worker_id`` still runs. Without its lock file here (a shared
        ``--storage`` used from another output directory or machine), a worker of this machine is
        alive while its process id is, and one of another machine counts as alive: only its own
        machine can tell."""
        path = self._lock_path(worker_id)
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            host, pid, _ = worker_id.split("@")
            return host != _HOST or _process_exists(int(pid))
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        remove_file(path, root=self.root)
        return False

    def close(self) -> None:
        """Give up the token (the process is done with the study)."""
        remove_file(self._path, root=self.root)
        os.close(self._fd)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, as another user's process
        pass
    return True


def connect_database(storage: str | None) -> RDBStorage | None:
    """The database ``storage`` names if it is a URL (connected now, so a bad one fails before any
    work), else None."""
    if not storage or "://" not in storage:
        return None
    try:
        return RDBStorage(storage)
    except (ImportError, ValueError, SQLAlchemyError) as exc:
        # A driver that is not installed, a malformed URL, or a database that cannot be reached.
        raise ConfigError(f"storage {storage}: cannot be opened ({' '.join(str(exc).split())[:200]})") from None


def journal_file(storage: str | None, default_journal: Path, root: str | Path) -> Path:
    """The journal file ``storage`` names (its folder must exist), or the sweep's own inside the
    output root ``root``; checked, not created."""
    if not storage:
        return inside_root(root, default_journal)
    path = Path(storage)
    if path.is_dir():
        raise ConfigError(f"storage {storage}: is a directory; name a journal file or a database URL")
    if not path.parent.is_dir():
        raise ConfigError(f"storage {storage}: folder {path.parent} does not exist")
    return path


def journal_storage(path: Path, own_root: str | Path | None) -> JournalStorage:
    """Optuna's multi-process file storage in the journal file ``path``; ``own_root``: the output
    root of a sweep's own journal, whose folder is made there (a named one's folder exists)."""
    if own_root is not None:
        make_dirs(path.parent, root=own_root)
    try:
        return JournalStorage(JournalFileBackend(str(path)))
    except OSError as exc:
        raise ConfigError(f"storage {path}: cannot be opened ({exc.strerror or exc})") from None


class SweepStudy:
    """One sweep's study, shared by every worker that opens it with the same name and storage."""

    def __init__(
        self, directory: Path, name: str, storage: RDBStorage | JournalStorage, space: Space, root: str | Path
    ) -> None:
        self.space = space
        self.lock = file_lock(directory / f"{safe_component(name, 'study name')}.lock", root=root)
        self.storage = storage
        with self.lock, warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            self.study = optuna.create_study(
                storage=self.storage,
                study_name=name,
                direction="maximize",
                load_if_exists=True,
                sampler=space.make_sampler(0),
            )
        self.worker = Worker(directory / "workers", root)

    # ---- setting up ---------------------------------------------------------------------------------
    def seed(self, warm: list[tuple[dict[str, Any], float, dict[str, Any]]]) -> int:
        """Add warm-start points as finished trials and queue the grid's points, skipping what the
        study already holds (so re-running the same command adds nothing). Returns how many warm
        points were added."""
        added = 0
        with self.lock:
            known = [t.params for t in self.study.get_trials(deepcopy=False, states=_ACTIVE)]
            for params, value, attrs in warm:
                if params in known:
                    continue
                self.study.add_trial(
                    optuna.trial.create_trial(
                        params=params, distributions=self.space.distributions, value=value, user_attrs=attrs
                    )
                )
                known.append(params)
                added += 1
            for point in self.space.points:
                self.study.enqueue_trial(point, skip_if_exists=True)
        return added

    # ---- handing out points -------------------------------------------------------------------------
    def claim(self) -> Trial | None:
        """The next point for this worker: a queued one, else a new one from the sampler while the
        budget lasts; ``None`` when there is nothing left to hand out now."""
        with self.lock, warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            self._reclaim_stale()
            trials = self.study.get_trials(deepcopy=False)
            waiting = any(t.state == TrialState.WAITING for t in trials)
            if not waiting and self.evaluations(trials) >= self.space.budget:
                return None
            self.study.sampler = self.space.make_sampler(len(trials))
            trial = self.study.ask(fixed_distributions=self.space.distributions)
            trial.set_user_attr(WORKER_ATTR, self.worker.id)
            return trial

    def others_running(self) -> bool:
        """Whether another worker is still evaluating a point (it may yet die and leave it to us)."""
        with self.lock:
            self._reclaim_stale()
            running = self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        return any(t.user_attrs.get(WORKER_ATTR) != self.worker.id for t in running)

    def complete(self, trial: Trial, value: float, record: dict[str, Any]) -> None:
        """Store an evaluated point."""
        trial.set_user_attr(POINT_ATTR, record)
        self.study.tell(trial, value)

    def finished(self, params: dict[str, Any]) -> FrozenTrial | None:
        """An earlier finished trial of exactly these parameters (a sampler may propose a point
        twice, e.g. a bound of the space): its result is reused rather than evaluated again."""
        for trial in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            if trial.params == params and POINT_ATTR in trial.user_attrs:
                return trial
        return None

    def repeat(self, trial: Trial, earlier: FrozenTrial) -> None:
        """Finish ``trial`` with the result of ``earlier``, a trial of the same parameters."""
        trial.set_user_attr(REPEAT_ATTR, earlier.number)
        self.study.tell(trial, earlier.value)

    def give_back(self, trial: Trial) -> None:
        """Fail a point this worker could not finish and queue it again, so it is not lost."""
        with self.lock:
            self.study.tell(trial, state=TrialState.FAIL)
            self.study.enqueue_trial(trial.params, user_attrs={"lmerge_retry_of": trial.number})

    def _reclaim_stale(self) -> None:
        for trial in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            owner = trial.user_attrs.get(WORKER_ATTR)
            # Claims happen under the lock we hold, so a trial without an owner lost its worker mid-claim.
            if owner == self.worker.id or (owner is not None and self.worker.alive(owner)):
                continue
            params = {**trial.system_attrs.get("fixed_params", {}), **trial.params}
            self.study.tell(trial.number, state=TrialState.FAIL)
            if set(self.space.distributions) <= set(params):
                self.study.enqueue_trial(params, user_attrs={"lmerge_retry_of": trial.number})

    # ---- reading back -------------------------------------------------------------------------------
    def evaluations(self, trials: list[FrozenTrial] | None = None) -> int:
        """Points evaluated, being evaluated or queued by this study (warm-start points excluded)."""
        trials = self.study.get_trials(deepcopy=False) if trials is None else trials
        return sum(1 for t in trials if t.state in _ACTIVE and WARM_ATTR not in t.user_attrs)

    def points(self) -> list[dict[str, Any]]:
        """Every finished point's record, in trial order (a repeated point once)."""
        return [
            {"trial": t.number, **t.user_attrs[POINT_ATTR]}
            for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if POINT_ATTR in t.user_attrs
        ]

    def close(self) -> None:
        self.worker.close()
