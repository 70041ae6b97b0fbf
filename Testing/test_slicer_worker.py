"""Model work off Slicer's GUI thread (issue 12 item 3): the worker, and sessions split into prepare/compute/finish.

Real MRML from slicer-core; the GUI thread is the test's thread, which calls `deliver()` as the
module's QTimer does in Slicer.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import slicer
from slicer_fixture import add_volume, blob_array, oblique_ijk_to_ras

from KPrismSlicerLib import nodes
from KPrismSlicerLib.logic import SegmentationCancelled
from KPrismSlicerLib.prompts import Prompt
from KPrismSlicerLib.worker import JobCancelled, JobControl, ModelWorker, shared_worker


@pytest.fixture
def worker():
    return ModelWorker(name="test worker")


@pytest.fixture
def blob(scene):
    volume = add_volume(scene, blob_array(), oblique_ijk_to_ras(), "blob")
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "blob segmentation")
    return volume, segmentation


def ras(ijk) -> list[float]:
    return (oblique_ijk_to_ras() @ [*ijk, 1.0])[:3].tolist()


def segment_array(segmentation, segment_id, volume) -> np.ndarray:
    return slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segment_id, volume)


def gate(worker: ModelWorker) -> threading.Event:
    """Keep the worker busy until the returned event is set (a long job in front of the queue)."""
    started, release = threading.Event(), threading.Event()
    worker.submit("long job", lambda control: started.set() or release.wait(30), lambda result: None)
    assert started.wait(30)
    return release


# ----------------------------------------------------------------------------------------------- the worker


def test_jobs_run_in_order_off_the_gui_thread_and_deliver_only_when_asked(worker):
    release = gate(worker)
    threads, done = [], []
    for n in range(3):
        worker.submit(f"job {n}", lambda control, n=n: threads.append(threading.current_thread()) or n * 10, done.append)
    assert worker.busy and worker.queued_labels() == ["job 0", "job 1", "job 2"]
    release.set()
    assert worker.wait(30) and not worker.busy
    assert done == []  # nothing reaches the GUI side before deliver()
    assert worker.deliver() == 4 and done == [0, 10, 20]
    assert threads and all(t is not threading.main_thread() for t in threads) and len(set(threads)) == 1
    assert worker.deliver() == 0


def test_errors_reach_on_error_and_a_failing_callback_does_not_stop_the_next(worker):
    errors, done = [], []
    worker.submit("fails", lambda control: 1 / 0, done.append, errors.append)
    worker.submit("callback fails", lambda control: "x", lambda result: [][0])
    worker.submit("fine", lambda control: "ok", done.append)
    worker.wait(30)
    assert worker.deliver() == 3
    assert [type(e) for e in errors] == [ZeroDivisionError] and done == ["ok"]


def test_cancel_stops_the_running_job_and_drops_queued_ones(worker):
    started, ran, errors = threading.Event(), [], []

    def long(control: JobControl) -> str:
        started.set()
        for n in range(3000):
            control.progress(n / 3000, "working")
            threading.Event().wait(0.01)
        return "finished"

    job = worker.submit("long", long, ran.append, errors.append)
    worker.submit("queued", lambda control: ran.append("queued ran"), ran.append, errors.append)
    assert started.wait(30)
    worker.cancel(drop_queued=True)
    assert worker.wait(30)
    worker.deliver()
    assert ran == [] and [type(e) for e in errors] == [JobCancelled, JobCancelled]
    assert job.state == "cancelled" and 0 <= job.fraction < 1
    assert shared_worker() is shared_worker()


# ----------------------------------------------------------------------------------------------- sessions on the worker


def test_a_click_on_the_worker_writes_the_segment_only_when_deliver_runs(scene, logic, blob, worker):
    volume, segmentation = blob
    session = logic.interactive(volume, segmentation, start=False)  # the model is loaded by the worker
    assert session.target is None
    prepared = session.prepare(Prompt.point(ras([24, 20, 6])))
    results = []
    worker.submit(prepared.label, prepared.compute, lambda delta: results.append(session.finish(prepared, delta)))
    assert worker.wait(120)
    assert nodes.segment_ids(segmentation) == [] and results == []  # computed, not written yet
    worker.deliver()
    (result,) = results
    written = segment_array(segmentation, result.segment_id, volume)
    assert written[6, 20, 24] == 1 and np.array_equal(written, session.target.result().mask)
    assert nodes.segment_name(segmentation, result.segment_id) == "KPrism 1"


def test_prompts_placed_while_busy_are_queued_in_order_and_none_is_lost(scene, logic, blob, worker):
    volume, segmentation = blob
    session = logic.interactive(volume, segmentation, start=False)
    release = gate(worker)
    clicks = [([24, 20, 6], True), ([30, 20, 6], False), ([24, 14, 7], True), ([18, 22, 5], False)]
    results = []
    for ijk, positive in clicks:  # each prepared while the earlier ones have not even started
        prepared = session.prepare(Prompt.point(ras(ijk), positive))
        worker.submit(prepared.label, prepared.compute,
                      lambda delta, prepared=prepared: results.append(session.finish(prepared, delta)))
    assert worker.queued_labels() == ["Click"] * 4
    release.set()
    assert worker.wait(300)
    worker.deliver()

    assert len(results) == 4 and len({r.segment_id for r in results}) == 1
    tag = nodes.segment_tag(segmentation.GetSegmentation().GetSegment(results[0].segment_id), nodes.PROVENANCE_TAG)
    import json

    recorded = json.loads(tag)["prompts"]
    assert [(p["positive"]) for p in recorded] == [positive for _, positive in clicks]
    np.testing.assert_allclose([p["ras"] for p in recorded], [np.round(ras(ijk), 3) for ijk, _ in clicks])
    assert np.array_equal(segment_array(segmentation, results[0].segment_id, volume), session.target.result().mask)
    for _ in clicks:  # every prompt is in the history: four undos take the segment back to empty
        session.undo()
    assert not segment_array(segmentation, results[0].segment_id, volume).any() and session.undo() is None


@pytest.mark.parametrize("cross_axes", [False, True])
def test_cancelling_a_propagation_leaves_target_and_segment_exactly_as_before(scene, logic, blob, worker, cross_axes):
    volume, segmentation = blob
    session = logic.interactive(volume, segmentation)
    clicked = session.add_click(ras([24, 20, 6]))
    before_segment = segment_array(segmentation, clicked.segment_id, volume).copy()
    before_target = session.target.result().probability.copy()
    before_steps, before_prompts = session.target.steps, list(session.prompts)

    prepared = session.prepare_propagate(cross_axes=cross_axes, min_quality=0.0, min_area_ratio=0.0,
                                         stop_when_unchanged=None)
    jobs, outcome = [], []

    def compute(control: JobControl):
        report = control.progress

        def progress(fraction: float, message: str) -> None:
            report(fraction, message)
            worker.cancel(jobs[0])  # the user presses Cancel once the first slice is reported

        control.progress = progress
        return prepared.compute(control)

    jobs.append(worker.submit(prepared.label, compute, outcome.append, outcome.append))
    assert worker.wait(300)
    worker.deliver()

    assert len(outcome) == 1 and isinstance(outcome[0], JobCancelled) and jobs[0].fraction > 0
    assert np.array_equal(session.target.result().probability, before_target)
    assert session.target.steps == before_steps and session.prompts == before_prompts
    assert np.array_equal(segment_array(segmentation, clicked.segment_id, volume), before_segment)
    session.undo()  # the history is intact: the click is still the last step
    assert not segment_array(segmentation, clicked.segment_id, volume).any()


def test_an_exception_in_compute_reaches_on_error_and_leaves_the_segment_untouched(scene, logic, blob, worker,
                                                                                 monkeypatch):
    volume, segmentation = blob
    session = logic.interactive(volume, segmentation)
    first = session.add_click(ras([24, 20, 6]))
    before = segment_array(segmentation, first.segment_id, volume).copy()
    before_target, before_steps = session.target.result().probability.copy(), session.target.steps
    encoded = session.encoded
    real_decode, calls = encoded.decode, []

    def failing(*args, **kwargs):  # the model runs out of memory
        calls.append(1)
        if len(calls) == 1:
            raise MemoryError("out of memory")
        return real_decode(*args, **kwargs)

    monkeypatch.setattr(encoded, "decode", failing)
    prepared = session.prepare(Prompt.point(ras([30, 20, 6]), positive=False))
    errors, done = [], []
    worker.submit(prepared.label, prepared.compute, done.append, errors.append)
    worker.wait(120)
    worker.deliver()
    assert done == [] and [type(e) for e in errors] == [MemoryError]
    assert np.array_equal(segment_array(segmentation, first.segment_id, volume), before)
    assert np.array_equal(session.target.result().probability, before_target) and session.target.steps == before_steps
    assert len(session.prompts) == 1
    monkeypatch.setattr(encoded, "decode", real_decode)
    assert session.add_click(ras([30, 20, 6]), positive=False).segment_id == first.segment_id  # still usable


def test_compute_never_touches_mrml(scene, logic, blob, worker, monkeypatch):
    """Every MRML helper refuses the worker thread; the volume is even zeroed between prepare and compute."""
    volume, segmentation = blob
    offenders = []
    for name in dir(nodes):
        function = getattr(nodes, name)
        if callable(function) and getattr(function, "__module__", "") == nodes.__name__ and not isinstance(function, type):
            def guarded(*args, _function=function, _name=name, **kwargs):
                if threading.current_thread() is not threading.main_thread():
                    offenders.append(_name)
                return _function(*args, **kwargs)

            monkeypatch.setattr(nodes, name, guarded)
    reference = logic.interactive(volume, segmentation, name="reference").add_click(ras([24, 20, 6]))
    expected = segment_array(segmentation, reference.segment_id, volume).copy()

    session = logic.interactive(volume, segmentation, name="worker", start=False)
    prepared = session.prepare(Prompt.point(ras([24, 20, 6])))
    original = slicer.util.arrayFromVolume(volume).copy()
    slicer.util.updateVolumeFromArray(volume, np.full_like(original, -900))  # the user edits the volume meanwhile
    results = []
    worker.submit(prepared.label, prepared.compute, lambda delta: results.append(session.finish(prepared, delta)))
    worker.wait(120)
    worker.deliver()
    assert offenders == [] and len(results) == 1
    # The click was answered on the voxels read when it was placed, not on what the volume holds now.
    assert np.array_equal(segment_array(segmentation, results[0].segment_id, volume), expected)


def test_a_semantic_run_on_the_worker_writes_on_deliver_and_cancel_writes_nothing(scene, logic, worker):
    from kprism.samples import sample_path
    from slicer_fixture import read_volume

    volume = read_volume(scene, sample_path("ct", "ts_ct_001crop.nii.gz"), "ct")
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    prepared = logic.prepare_segment(volume, segmentation, "semantic", ["liver", "spleen"])
    outcomes = []
    # Cancel pressed as soon as the run starts (cancel() with no job: the running one).
    worker.submit(prepared.label, lambda control: (worker.cancel(), prepared.compute(control))[1],
                  outcomes.append, outcomes.append)
    worker.wait(300)
    worker.deliver()
    assert [type(o) for o in outcomes] == [SegmentationCancelled] and nodes.segment_ids(segmentation) == []

    prepared = logic.prepare_segment(volume, segmentation, "semantic", ["liver"])
    written = []
    worker.submit(prepared.label, prepared.compute, lambda outcome: written.append(logic.finish_segment(prepared, outcome)))
    worker.wait(300)
    assert nodes.segment_ids(segmentation) == []
    worker.deliver()
    assert list(written[0]) == ["liver"] and segment_array(segmentation, written[0]["liver"], volume).any()
    np.testing.assert_allclose(nodes.segment_color(segmentation, written[0]["liver"]), np.array([221, 130, 101]) / 255)
