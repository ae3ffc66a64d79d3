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

import contextlib
import fcntl
import os
import socket
import uuid
import warnings
from pathlib import Path
from typing import Any

import optuna
from filelock import FileLock
from optuna.storages import JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, Trial, TrialState
from sqlalchemy.exc import SQLAlchemyError

from lmerge.errors import ConfigError
from lmerge.sweep.space import Space

WORKER_ATTR = "lmerge_worker"
POINT_ATTR = "lmerge_point"
WARM_ATTR = "lmerge_warm_start"
REPEAT_ATTR = "lmerge_repeat_of"
_ACTIVE = (TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING)

# Optuna's own notes (a missing optional package, each finished trial) would drown the sweep's output.
optuna.logging.set_verbosity(optuna.logging.ERROR)


class Worker:
    """This process's liveness token: an exclusive lock on ``<directory>/<id>.lock``, released
    by the operating system when the process ends, however it ends."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.id = f"{socket.gethostname()}@{os.getpid()}@{uuid.uuid4().hex[:8]}"
        self.directory = directory
        self._path = directory / f"{self.id}.lock"
        self._fd = os.open(self._path, os.O_CREAT | os.O_RDWR, 0o644)
        fcntl.flock(self._fd, fcntl.LOCK_EX)

    def alive(self, worker_id: str) -> bool:
        """Whether the worker ``worker_id`` still runs. Without its lock file here (a shared
        ``--storage`` used from another output directory or machine), a worker of this machine is
        alive while its process id is, and one of another machine counts as alive: only its own
        machine can tell."""
        path = self.directory / f"{worker_id}.lock"
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            host, pid, _ = worker_id.split("@")
            return host != socket.gethostname() or _process_exists(int(pid))
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        return False

    def close(self) -> None:
        """Give up the token (the process is done with the study)."""
        with contextlib.suppress(FileNotFoundError):
            self._path.unlink()
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


def journal_storage(storage: str | None, default_journal: Path) -> JournalStorage:
    """The journal file ``storage`` names, or the sweep's own (Optuna's multi-process file storage)."""
    path = Path(storage) if storage else default_journal
    path.parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(path)))


class SweepStudy:
    """One sweep's study, shared by every worker that opens it with the same name and storage."""

    def __init__(self, directory: Path, name: str, storage: RDBStorage | JournalStorage, space: Space) -> None:
        self.space = space
        self.lock = FileLock(str(directory / f"{name}.lock"))
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
        self.worker = Worker(directory / "workers")

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
