"""The demo's long steps (fine-tunes, learners) as their own ``lmerge`` processes, several at once.

One fit of the demo's small model cannot keep even two cores busy: its GEMMs are small and
Python's own work between them runs on one thread (two one-thread fits side by side learn 1.36x
faster than two two-thread fits one after the other on the project's 2-core machine, with the
same losses). So the cores are shared out: ``workers`` processes at a time, each with
``cores // workers`` threads. Each process is the ``lmerge`` command a user would run, its
console written to a log file; the demo prints one line when it starts and one when it ends.
Once no job is left to start, the cores of those that have ended go to those still running
(:class:`CoreShare`): a fit learning alone at the end of a batch takes both cores, 1.4x faster.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lmerge.callbacks import THREADS_FILE_ENV
from lmerge.errors import ConfigError, LMergeError, unknown_name
from lmerge.outputs import write_bytes_atomic

_POLL_SECONDS = 0.2


@dataclass(frozen=True)
class Job:
    """One ``lmerge`` run of the demo."""

    name: str
    """What the console calls it (a task, a learner)."""
    argv: list[str]
    """The ``lmerge`` arguments."""
    log: Path
    """Where its console (stdout and stderr) goes."""


@dataclass(frozen=True)
class Finished:
    """A job that ended well."""

    job: Job
    seconds: float
    """Its wall time."""
    output: str
    """Its console."""


def available_cores() -> int:
    """The cores this process may run on (its affinity, else the machine's)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


PRECISIONS = ("auto", "32-true", "bf16-mixed")
"""What ``lmerge demo --learner_precision`` and ``--ranking_precision`` take: Lightning's names,
or ``auto``."""


def native_bf16() -> bool:
    """Whether the fits' device computes bf16 natively: a CUDA GPU that supports it, or a CPU with
    AVX512-BF16 or AMX (elsewhere oneDNN emulates bf16, slower than float32)."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, check, lambda: False)() for check in checks)


def demo_precision(requested: str, key: str) -> str:
    """The precision for ``requested`` (the demo's argument ``key``): ``auto`` is ``bf16-mixed``
    where the device computes bf16 natively, else ``32-true``. Where the demo uses it, measured on
    the demo (AVX512-BF16): the learners, whose SuperMerge fit runs 1.25x faster per step with the
    same validation losses to three digits at every check (its coefficients barely feel bf16's
    rounding of the frozen model's activations). The sweeps' ranking on the validation split is
    1.5x faster in bf16 with scores within one example of float32's, but that one example can move
    a max-min ranking's choice (Iso-C's lambda on the demo): the demo ranks in float32 unless asked.
    Not the fine-tuner, whose LoRA factors train and which is no faster in bf16 (25 steps behind
    float32's after 250), nor any test score."""
    if requested not in PRECISIONS:
        raise ConfigError(f"{key}: {unknown_name('precision', requested, PRECISIONS)}")
    if requested != "auto":
        return requested
    return "bf16-mixed" if native_bf16() else "32-true"


def plan(jobs: int, requested: int, cores: int) -> tuple[int, int]:
    """``(workers, threads)``: processes at a time (``requested``, or with 0 one per core) and
    the threads each gets, ``cores // workers`` and at least one."""
    workers = max(1, min(requested if requested > 0 else cores, jobs))
    return workers, max(1, cores // workers)


@dataclass
class CoreShare:
    """The cores shared between the running jobs and this process's own work: each job's fit
    follows the thread count written in ``path`` (:class:`lmerge.callbacks.ThreadBudget`), which
    :func:`run_jobs` raises once no job is left to start and some have ended."""

    path: Path
    """The file the jobs read (under ``root``)."""
    root: Path
    """The folder ``path`` is written in."""
    cores: int
    """The cores to share."""
    own_work: threading.Event = field(default_factory=threading.Event)
    """Set while this process does its own steps (on one core) beside the jobs."""

    def threads_each(self, running: int, pending: bool, threads: int) -> int:
        """Threads for each of ``running`` jobs: their ``threads`` while jobs wait to start, then
        the cores that this process's own work leaves, shared out."""
        if pending or not running:
            return threads
        return max(threads, (self.cores - self.own_work.is_set()) // running)

    def write(self, threads: int) -> None:
        """Tell the jobs they may use ``threads`` threads each."""
        write_bytes_atomic(self.path, f"{threads}\n".encode(), root=self.root)


def run_jobs(
    jobs: list[Job],
    workers: int,
    threads: int,
    on_finish: Callable[[Finished], None] = lambda done: None,
    stop: threading.Event | None = None,
    idle: threading.Event | None = None,
    share: CoreShare | None = None,
) -> float:
    """Run ``python -m lmerge <argv>`` of every job, ``workers`` at a time with ``threads`` threads
    each, in order (their logs' folders must exist); ``on_finish`` gets each as it ends well. The
    first that fails stops the others and raises one line naming it and its log; setting ``stop``
    stops them all and returns; ``idle`` is set once a worker has nothing left to start (and when
    this returns or raises); with ``share``, the jobs still running take the cores of those that
    have ended. Returns the peak
    memory (RSS, MB) of this process and its running jobs together, as sampled while they ran (0
    where ``/proc`` is not there)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    granted = threads
    if share is not None:
        share.write(granted)
        env[THREADS_FILE_ENV] = str(share.path)
    # A learner's batches come in many shapes (grouped by length), and in bf16 each shape's GEMMs
    # are a oneDNN primitive kept in a cache of 1024 with its scratch memory: a SuperMerge fit held
    # 1.55 GB after 60 steps, 1.29 GB with a cache of 8, 2% apart in time (float32: 1.04 GB).
    env.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "8")
    pending = list(jobs)
    running: dict[subprocess.Popen, tuple[Job, float]] = {}
    peak = 0.0
    try:
        while (pending or running) and not (stop is not None and stop.is_set()):
            while pending and len(running) < workers:
                job = pending.pop(0)
                with job.log.open("wb") as log:
                    command = [sys.executable, "-m", "lmerge", *job.argv]
                    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
                running[process] = (job, time.perf_counter())
            if idle is not None and not pending and len(running) < workers:
                idle.set()
            time.sleep(_POLL_SECONDS)
            peak = max(peak, _rss_mb(os.getpid()) + sum(_rss_mb(p.pid) for p in running))
            for process in [p for p in running if p.poll() is not None]:
                job, started = running.pop(process)
                output = job.log.read_text(errors="replace")
                if process.returncode != 0:
                    last = next((line for line in reversed(output.splitlines()) if line.strip()), "no output")
                    raise LMergeError(
                        f"demo step {job.name}: `lmerge {' '.join(job.argv[:3])} ...` ended with exit code "
                        f"{process.returncode}: {last.strip()} (its console: {job.log})"
                    )
                on_finish(Finished(job, time.perf_counter() - started, output))
            if share is not None:
                now = share.threads_each(len(running), bool(pending), threads)
                if now != granted:
                    share.write(now)
                    granted = now
    finally:
        if idle is not None:
            idle.set()
        for process in running:
            process.terminate()
        for process in running:
            process.wait()
    return peak


def _rss_mb(pid: int) -> float:
    """The resident memory of process ``pid`` in MB, from ``/proc`` (0 where it cannot be read)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0.0


class _Background:
    """:func:`run_jobs` on a thread of its own; :meth:`wait` joins it and raises what it raised."""

    def __init__(
        self, jobs: list[Job], workers: int, threads: int, on_finish: Callable[[Finished], None], share: CoreShare
    ) -> None:
        self.stop = threading.Event()
        self.idle = threading.Event()
        self.peak_rss_mb = 0.0
        self.error: BaseException | None = None
        args = (jobs, workers, threads, on_finish, share)
        self.thread = threading.Thread(target=self._run, args=args, daemon=True)
        self.thread.start()

    def _run(
        self, jobs: list[Job], workers: int, threads: int, on_finish: Callable[[Finished], None], share: CoreShare
    ) -> None:
        try:
            self.peak_rss_mb = run_jobs(jobs, workers, threads, on_finish, self.stop, self.idle, share)
        except BaseException as exc:  # handed to the waiting thread
            self.error = exc

    def wait(self) -> float:
        """The jobs' peak memory, once they have all ended; raises what :func:`run_jobs` raised."""
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.peak_rss_mb


class FitRunner:
    """Runs the demo's ``lmerge fit`` steps as :func:`run_jobs`: each gets its own TensorBoard
    version under ``<logs_dir>/lightning_logs`` (chosen here: processes that start together would
    otherwise both take the next free one, and share a checkpoint folder) and a console log in
    ``consoles``; ``extra`` ends every command (e.g. the user's own ``lmerge fit`` flags)."""

    def __init__(self, logs_dir: Path, consoles: Path, requested: int, extra: list[str]) -> None:
        self.logs_dir = logs_dir
        self.consoles = consoles
        self.requested = requested
        self.extra = extra
        self.log_dirs: dict[str, Path] = {}
        """Job name -> its TensorBoard log folder."""
        self.peak_rss_mb = 0.0
        """The most memory this process and its running jobs held together."""

    def job(self, name: str, log_name: str, argv: list[str]) -> Job:
        """The job ``name`` running ``lmerge <argv>``, with its own TensorBoard version."""
        version = f"version_{self._next_version()}"
        self.log_dirs[name] = self.logs_dir / "lightning_logs" / version
        logger = ["--trainer.logger", "lightning.pytorch.loggers.TensorBoardLogger"]
        logger += ["--trainer.logger.save_dir", str(self.logs_dir), "--trainer.logger.version", version]
        return Job(name, [*argv, *logger, *self.extra], self.consoles / f"{log_name}.log")

    def run(self, jobs: list[Job], doing: str, on_finish: Callable[[Finished], None]) -> None:
        """Run ``jobs`` (one line says what they are ``doing``), calling ``on_finish`` as each ends."""
        if not jobs:
            return
        with self._share() as share:
            peak = run_jobs(jobs, *self._plan(jobs, doing), on_finish, share=share)
        self.peak_rss_mb = max(self.peak_rss_mb, peak)

    @contextlib.contextmanager
    def beside(
        self, jobs: list[Job], doing: str, on_finish: Callable[[Finished], None]
    ) -> Iterator[Callable[[], None]]:
        """Run ``jobs`` as :meth:`run` does, on a thread of its own, while the ``with`` block does
        this process's own work in the cores they leave idle: the block gets ``pace``, to call
        before each of its steps, which waits until a worker has no job left to start (the end of
        the batch, where the last jobs run alone), then gives this process one thread while jobs
        still run and all of its threads once they have ended. Leaving the block waits for the
        jobs; a job's failure is raised at the next ``pace`` or then; when the block raises, the jobs
        are stopped. ``on_finish`` runs on the jobs' thread."""
        own_threads = torch.get_num_threads()
        if not jobs:
            yield lambda: None
            return
        with self._share() as share:
            plan = self._plan(jobs, doing, ", this process's steps below once a core is idle")
            background = _Background(jobs, *plan, on_finish, share)

            def pace() -> None:
                background.idle.wait()
                if background.error is not None:
                    raise background.error
                torch.set_num_threads(1 if background.thread.is_alive() else own_threads)
                share.own_work.set()

            try:
                yield pace
            except BaseException:
                background.stop.set()
                background.thread.join()
                raise
            finally:
                # This process's steps are done: the jobs still running may take its core too.
                share.own_work.clear()
                torch.set_num_threads(own_threads)
            self.peak_rss_mb = max(self.peak_rss_mb, background.wait())

    @contextlib.contextmanager
    def _share(self) -> Iterator[CoreShare]:
        """A :class:`CoreShare` of this machine's cores, its file in a temporary folder."""
        with tempfile.TemporaryDirectory(prefix="lmerge-threads-") as folder:
            yield CoreShare(Path(folder) / "threads", Path(folder), available_cores())

    def _plan(self, jobs: list[Job], doing: str, where: str = "") -> tuple[int, int]:
        """:func:`plan` for ``jobs``, said in one line."""
        workers, threads = plan(len(jobs), self.requested, available_cores())
        names = ", ".join(job.name for job in jobs)
        print(f"  {doing} {names}: {workers} at a time, {threads} thread(s) each{where} (consoles: {self.consoles})")
        return workers, threads

    def _next_version(self) -> int:
        """One past the highest version number there is on disk or handed out already."""
        names = [p.name for p in (self.logs_dir / "lightning_logs").glob("version_*")]
        names += [d.name for d in self.log_dirs.values()]
        numbers = [int(number) for _, number in (n.split("_", 1) for n in names) if number.isdigit()]
        return max(numbers, default=-1) + 1
