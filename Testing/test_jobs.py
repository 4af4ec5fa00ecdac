"""OEFPredictorLib.jobs.BackgroundJob, the one job class of the prediction and the RNST panels:
real threads, real events; the targets are small functions that stand in for a long run."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from OEFPredictorLib import jobs, predict
from OEFPredictorLib.errors import CancelledError


class Stop(RuntimeError):
    """A module's own cancel error (as RNSTCancelled)."""


def counting_target(steps=5, delay=0.01, error=None):
    def target(progress, cancel_event):
        for i in range(steps):
            if cancel_event.is_set():
                raise Stop("stopped")
            time.sleep(delay)
            progress((i + 1) / steps, f"step {i + 1}")
        if error is not None:
            raise error
        return {"steps": steps}

    return target


def test_result_progress_and_one_run_per_job():
    job = jobs.BackgroundJob(counting_target(), cancel_errors=(Stop,))
    with pytest.raises(RuntimeError, match="not started"):
        job.wait()
    assert job.start() is job
    with pytest.raises(RuntimeError, match="already been started"):
        job.start()
    assert job.wait(timeout=10) == {"steps": 5}
    events = job.poll_events()
    assert [f for f, _ in events] == [0.2, 0.4, 0.6, 0.8, 1.0, 1.0] and events[-1][1] == "finished"
    assert job.done and not job.running and not job.cancelled and job.error is None


def test_cancel_uses_the_modules_own_error_type():
    job = jobs.BackgroundJob(counting_target(steps=200), cancel_errors=(Stop,)).start()
    job.cancel()
    with pytest.raises(Stop):
        job.wait(timeout=10)
    assert job.cancelled and job.result is None and job.poll_events()[-1] == (1.0, "cancelled")


def test_error_is_raised_by_wait_and_is_not_a_cancel():
    job = jobs.BackgroundJob(counting_target(error=ValueError("bad input"))).start()
    with pytest.raises(ValueError, match="bad input"):
        job.wait(timeout=10)
    assert not job.cancelled and isinstance(job.error, ValueError) and job.result is None


def test_cancel_after_the_result_was_taken_changes_nothing():
    """A finished job stays finished: cancel() after wait() returned must not turn it into
    'cancelled' nor drop the result that the caller already holds (and may have written)."""
    job = jobs.BackgroundJob(counting_target()).start()
    result = job.wait(timeout=10)
    job.cancel()
    assert not job.cancelled and job.error is None and job.result is result
    assert job.wait() is result


def test_cancel_before_the_result_was_taken_discards_it():
    job = jobs.BackgroundJob(counting_target(steps=1)).start()
    while job.running:
        time.sleep(0.005)
    job.cancel()  # finished, but nobody took the result: Cancel still means nothing is written
    with pytest.raises(CancelledError):
        job.wait()
    assert job.cancelled and job.result is None


def test_call_interruptibly_returns_at_once_on_cancel():
    cancel = threading.Event()
    release = threading.Event()
    threading.Timer(0.1, cancel.set).start()
    t0 = time.perf_counter()
    with pytest.raises(CancelledError):
        jobs.call_interruptibly(lambda: release.wait(10) and "loaded", cancel)
    assert time.perf_counter() - t0 < 1.0
    release.set()
    assert jobs.call_interruptibly(lambda: 42, threading.Event()) == 42
    with pytest.raises(KeyError):
        jobs.call_interruptibly(lambda: {}["missing"], threading.Event())


def test_prediction_job_cancel_while_the_model_loads_is_prompt(monkeypatch):
    """The first cancel of a session used to wait for Keras to load the model (3.7 s). Loading is
    stood in for by a resolve_model that takes 5 s; the cancel must end the job within 1 s."""
    loaded = threading.Event()

    def slow_resolve(model=None, method="lstm", protocol=None):
        time.sleep(5.0)
        loaded.set()
        return None

    monkeypatch.setattr(predict, "resolve_model", slow_resolve)
    rng = np.random.default_rng(0)
    inputs = predict.PredictionInputs(rng.random((2, 2, 2, 3), dtype=np.float32) + 1, np.zeros((2, 2, 2), np.float32),
                                      None)
    job = predict.PredictionJob(inputs, model="some.keras", method="lstm").start()
    deadline = time.perf_counter() + 5
    while not any("Loading" in m for _, m in job.poll_events()):
        assert time.perf_counter() < deadline
        time.sleep(0.01)
    t0 = time.perf_counter()
    job.cancel()
    with pytest.raises(CancelledError):
        job.wait(timeout=10)
    assert time.perf_counter() - t0 < 1.0 and job.cancelled and not loaded.is_set()
