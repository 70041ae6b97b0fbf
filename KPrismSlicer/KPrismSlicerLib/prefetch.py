"""Encode the slices around the user's while the model worker has nothing else to do.

A click costs only the decoder on a slice whose features are cached; on a slice not yet encoded it
first pays the encoder (tens of ms for `kprism-tiny`, 1–2 s for `kprism-medsam` on two CPU cores).
After each result the effect asks for the slices around the one just prompted; they are encoded one
at a time, nearest first, on the shared model worker, and the prefetch gives way as soon as any
other job is queued: a user's prompt waits for at most one slice's encoding, and the prefetch
resumes behind it. The volume's encoder cache (and, for `medsam`, the on-disk embedding cache)
keeps what was encoded.

Plain Python (no Qt): tested with a real model and worker under slicer-core.
"""

from __future__ import annotations

from typing import Any, Optional

from .worker import Job, JobControl, ModelWorker

PREFETCH_RADIUS = 12  # slices on each side: a structure's usual extent around the clicked slice


def nearest_first(index: int, count: int, radius: int) -> list[int]:
    """index, index+1, index-1, index+2, … within [0, count) and `radius` of index."""
    order = [index] if 0 <= index < count else []
    for step in range(1, radius + 1):
        order += [i for i in (index + step, index - step) if 0 <= i < count]
    return order


class SlicePrefetcher:
    """Encodes the slices around the last prompted one in the worker's idle time (GUI-thread API)."""

    LABEL = "KPrism prefetch"

    def __init__(self, worker: ModelWorker, radius: int = PREFETCH_RADIUS) -> None:
        self.worker, self.radius = worker, radius
        self._request: Optional[tuple[Any, int, list[int]]] = None  # (encoded image, axis, slices still to encode)
        self._job: Optional[Job] = None
        self.encoded_count = 0  # slices this prefetcher encoded (the rest were cached already)

    def around(self, encoded: Any, axis: int, index: int) -> None:
        """Encode the slices of `encoded` (an EncodedImage) along `axis` around `index`; replaces any earlier request."""
        self._request = (encoded, axis, nearest_first(index, encoded.num_slices(axis), self.radius))
        self._submit()

    def stop(self) -> None:
        """Forget the request; a running prefetch stops after its current slice."""
        self._request = None
        if self._job is not None and not self._job.finished:
            self.worker.cancel(self._job)

    @property
    def pending(self) -> list[int]:
        """Slices still to encode for the current request (nearest first)."""
        return list(self._request[2]) if self._request else []

    def _submit(self) -> None:
        if self._request is None or (self._job is not None and not self._job.finished):
            return  # the running prefetch picks up the new request at its next slice
        self._job = self.worker.submit(self.LABEL, self._compute, self._done, self._failed)

    def _compute(self, control: JobControl) -> None:
        """Worker thread: encode one slice at a time until done, cancelled, or another job waits."""
        while not control.cancelled():
            request = self._request  # read once: the GUI thread may replace it between slices
            if request is None:
                return
            encoded, axis, order = request
            while order and encoded.is_encoded(axis, order[0]):
                order.pop(0)
            if not order or self.worker.queued_labels():
                return
            encoded.features(axis, [order[0]])
            self.encoded_count += 1

    def _failed(self, _error: BaseException) -> None:
        """GUI thread: a prefetch that failed or was cancelled is not retried (the next prompt's own encoding reports errors)."""
        self._job, self._request = None, None

    def _done(self, _result: Any = None) -> None:
        """GUI thread: resubmit behind whatever job made the prefetch give way, while slices are left."""
        self._job = None
        if self._request is not None and self._request[2]:
            self._submit()
