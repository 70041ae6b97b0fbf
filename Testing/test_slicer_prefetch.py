"""Slices around the user's are encoded in the model worker's idle time, and give way to the user's prompts."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from kprism.encoded_image import EncodedImage
from kprism.weights import load_model
from KPrismSlicerLib.prefetch import SlicePrefetcher, nearest_first
from KPrismSlicerLib.worker import ModelWorker


@pytest.fixture(scope="module")
def model():
    return load_model("kprism-tiny")[0]


@pytest.fixture
def volume(model):
    rng = np.random.default_rng(0)
    return EncodedImage(model, rng.normal(40, 20, (30, 48, 48)).astype(np.float32), modality="ct", threads=1)


def gate(worker: ModelWorker) -> threading.Event:
    """Keep the worker busy until the returned event is set, so what is submitted next waits in the queue."""
    started, release = threading.Event(), threading.Event()
    worker.submit("a long job", lambda control: started.set() or release.wait(30), lambda result: None)
    assert started.wait(30)
    return release


def run_all(worker: ModelWorker) -> None:
    """What Slicer's QTimer does: deliver finished jobs (which may queue more) until nothing is left."""
    while True:
        assert worker.wait(120)
        if not worker.deliver() and not worker.busy:
            return


def test_nearest_slices_first_within_the_radius_and_the_volume():
    assert nearest_first(5, 30, 2) == [5, 6, 4, 7, 3]
    assert nearest_first(0, 30, 2) == [0, 1, 2]
    assert nearest_first(29, 30, 1) == [29, 28]


def test_the_slices_around_the_prompted_one_are_encoded_and_no_others(volume):
    worker = ModelWorker(name="prefetch test")
    prefetcher = SlicePrefetcher(worker, radius=3)
    volume.features(0, [10])  # the prompted slice: encoded by the prompt itself
    prefetcher.around(volume, 0, 10)
    run_all(worker)
    assert [i for i in range(30) if volume.is_encoded(0, i)] == list(range(7, 14))
    assert prefetcher.encoded_count == 6 and prefetcher.pending == []


def test_a_prompt_queued_meanwhile_runs_before_the_rest_of_the_prefetch(volume):
    worker = ModelWorker(name="prefetch test")
    prefetcher = SlicePrefetcher(worker, radius=5)
    release = gate(worker)
    prefetcher.around(volume, 0, 20)  # queued behind the long job
    seen_by_prompt = []
    worker.submit("user click", lambda control: seen_by_prompt.append(prefetcher.encoded_count), lambda result: None)
    release.set()
    run_all(worker)
    assert seen_by_prompt == [0]  # the prefetch gave way at once: the click did not wait for 11 encodings
    assert all(volume.is_encoded(0, i) for i in range(15, 26)) and prefetcher.encoded_count == 11


def test_a_failing_prefetch_is_dropped_not_retried_and_stop_forgets_the_request(volume):
    worker = ModelWorker(name="prefetch test")
    prefetcher = SlicePrefetcher(worker, radius=2)

    class Broken:
        def num_slices(self, axis):
            return 10

        def is_encoded(self, axis, index):
            return False

        def features(self, axis, indices):
            raise RuntimeError("encoder failed")

    prefetcher.around(Broken(), 0, 4)
    run_all(worker)
    assert prefetcher.pending == [] and not worker.busy
    release = gate(worker)
    prefetcher.around(volume, 0, 3)
    prefetcher.stop()  # the user left the segment before the prefetch's turn came
    release.set()
    run_all(worker)
    assert prefetcher.pending == [] and not any(volume.is_encoded(0, i) for i in range(1, 6))
