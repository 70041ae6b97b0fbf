"""One background thread for all of KPrism's model work, so Slicer's GUI thread never waits on the model.

The module panel and the Segment Editor effect share one `ModelWorker` (`shared_worker()`): jobs
run one at a time, in the order they were submitted, so two jobs never use the model or a target
at once. A job is split in two:

- ``compute(control)`` runs on the worker thread. It may use torch and kprism objects, and must not
  touch MRML or Qt (neither is thread-safe); it reports progress and honours Cancel through `control`.
- ``on_done(result)`` / ``on_error(error)`` run on the GUI thread when it calls `deliver()` (in
  Slicer a ~30 ms `qt.QTimer`; in tests and batch `wait()` then `deliver()`), always in submit order.
  They are where MRML is written.

Plain Python (no Qt, no torch): importable before KPrism's dependencies are installed.
"""

from __future__ import annotations

import collections
import logging
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Optional, TypeVar

T = TypeVar("T")

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"


class JobCancelled(RuntimeError):
    """The user cancelled the job; its compute left everything as it was."""

    def __init__(self, message: str = "Cancelled; nothing was changed.") -> None:
        super().__init__(message)


@dataclass(eq=False)
class Job(Generic[T]):
    """One submitted unit of work; its fields are read by the GUI (progress) and written by the worker."""

    label: str
    compute: Callable[["JobControl"], T]
    on_done: Callable[[T], None]
    on_error: Optional[Callable[[BaseException], None]] = None
    state: str = QUEUED
    fraction: float = 0.0
    message: str = ""
    result: Any = None
    error: Optional[BaseException] = None
    _cancel: threading.Event = field(default_factory=threading.Event, repr=False)

    @property
    def finished(self) -> bool:
        return self.state in (DONE, FAILED, CANCELLED)


class JobControl:
    """What a running compute sees of its job: report progress, notice Cancel."""

    def __init__(self, job: Optional[Job] = None) -> None:
        self._job = job

    def progress(self, fraction: float, message: str = "") -> None:
        """Report progress (0–1) and a short message; raises JobCancelled once Cancel was pressed."""
        if self._job is not None:
            self._job.fraction, self._job.message = min(max(float(fraction), 0.0), 1.0), str(message)
        self.check()

    def cancelled(self) -> bool:
        return self._job is not None and self._job._cancel.is_set()

    def check(self) -> None:
        """Raise JobCancelled if Cancel was pressed (call it between steps)."""
        if self.cancelled():
            raise JobCancelled()


class ModelWorker:
    """Runs submitted jobs one after another on one daemon thread (started on first submit)."""

    def __init__(self, name: str = "KPrism model worker") -> None:
        self.name = name
        self._lock = threading.Condition()
        self._queued: collections.deque[Job] = collections.deque()
        self._finished: collections.deque[Job] = collections.deque()
        self._running: Optional[Job] = None
        self._thread: Optional[threading.Thread] = None

    # ------------------------------------------------------------------------------ GUI thread
    def submit(self, label: str, compute: Callable[[JobControl], T], on_done: Callable[[T], None],
               on_error: Optional[Callable[[BaseException], None]] = None) -> Job[T]:
        """Queue `compute` (worker thread); `on_done(result)` or `on_error(error)` follow from `deliver()`."""
        job = Job(label, compute, on_done, on_error)
        with self._lock:
            self._queued.append(job)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
                self._thread.start()
            self._lock.notify_all()
        return job

    def deliver(self) -> int:
        """Run the callbacks of finished jobs, in submit order; returns how many were delivered.

        A cancelled job reaches `on_error` with JobCancelled. A callback that raises is logged and
        does not stop the ones after it.
        """
        delivered = 0
        while True:
            with self._lock:
                if not self._finished:
                    return delivered
                job = self._finished.popleft()
            delivered += 1
            try:
                if job.state == DONE:
                    job.on_done(job.result)
                elif job.on_error is not None:
                    job.on_error(job.error)  # type: ignore[arg-type]
                elif job.state == FAILED:
                    logging.error("KPrism: %s failed: %s", job.label, job.error, exc_info=job.error)
            except Exception:
                logging.exception("KPrism: delivering the result of %s failed", job.label)

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Block until nothing is queued or running (tests, batch); False if `timeout` seconds passed first."""
        with self._lock:
            return self._lock.wait_for(lambda: not self._queued and self._running is None, timeout)

    def cancel(self, job: Optional[Job] = None, drop_queued: bool = False) -> None:
        """Cancel `job` (default: the running one); `drop_queued` also cancels every queued job.

        A queued job that is cancelled never runs; a running one stops at its next progress/check.
        """
        with self._lock:
            targets = [job] if job is not None else ([self._running] if self._running is not None else [])
            if drop_queued:
                targets += list(self._queued)
            for target in targets:
                target._cancel.set()
            self._lock.notify_all()

    @property
    def busy(self) -> bool:
        """A job is running or queued."""
        with self._lock:
            return self._running is not None or bool(self._queued)

    @property
    def current(self) -> Optional[Job]:
        """The running job (its `fraction` and `message` show progress), or None."""
        return self._running

    def queued_labels(self) -> list[str]:
        """Labels of the jobs waiting behind the running one, in the order they will run."""
        with self._lock:
            return [job.label for job in self._queued]

    # ------------------------------------------------------------------------------ worker thread
    def _loop(self) -> None:
        while True:
            with self._lock:
                self._lock.wait_for(lambda: bool(self._queued))
                job = self._queued.popleft()
                self._running = job
                job.state = RUNNING
            self._run(job)
            with self._lock:
                self._running = None
                self._finished.append(job)
                self._lock.notify_all()

    @staticmethod
    def _run(job: Job) -> None:
        if job._cancel.is_set():
            job.state, job.error = CANCELLED, JobCancelled()
            return
        try:
            job.result = job.compute(JobControl(job))
            job.state, job.fraction = DONE, 1.0
        except JobCancelled as error:
            job.state, job.error = CANCELLED, error
        except BaseException as error:  # noqa: BLE001 (handed to the GUI thread, never lost on the worker)
            job.state, job.error = FAILED, error


_shared: Optional[ModelWorker] = None
_shared_lock = threading.Lock()


def shared_worker() -> ModelWorker:
    """The one worker of the application, shared by the module panel and the Segment Editor effect."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = ModelWorker()
        return _shared
