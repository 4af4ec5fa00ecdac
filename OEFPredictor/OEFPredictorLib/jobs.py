"""One background job class for every long run of the extension (prediction, RNST).

A job runs target(progress, cancel_event) in a daemon thread. The caller's thread (Slicer's main
thread, a script) polls progress events, may cancel, and finally takes the result with wait():

    job = BackgroundJob(target).start()
    ... job.poll_events() from a GUI timer, job.cancel() on the Cancel button ...
    result = job.wait()          # the result, or the run's error (a cancel error when cancelled)

Rules, each guarding a race between the two threads:
- a cancelled or failed run never yields a result;
- a cancel that arrives after the run's last cancel check, but before anybody took the result,
  still discards it ("Cancel means nothing is written");
- once wait() has handed the result out, cancel() changes nothing: a finished job stays finished.
"""
from __future__ import annotations

import queue
import threading
from typing import Any, Callable

from .errors import CancelledError

Progress = Callable[[float, str], None]


class BackgroundJob:
    """target(progress, cancel_event) -> result, in a background thread (see the module doc).

    cancel_errors: the exception types the target raises when it sees cancel_event; the first one
    is also raised for a result discarded by a late cancel.
    """

    thread_name = "BackgroundJob"

    def __init__(self, target: Callable[[Progress, threading.Event], Any] | None = None, *,
                 cancel_errors: tuple[type[BaseException], ...] = (CancelledError,)):
        self.target = target
        self.cancel_errors = tuple(cancel_errors)
        self._cancel = threading.Event()
        self._events: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._result: Any = None
        self._error: BaseException | None = None
        self._delivered = False  # wait() handed the result out

    # --- worker side ---------------------------------------------------------------------------
    def run_target(self, progress: Progress, cancel_event: threading.Event):
        """The work; subclasses override this instead of passing a target."""
        return self.target(progress, cancel_event)

    def _run(self):
        try:
            result = self.run_target(self._on_progress, self._cancel)
            with self._lock:  # against a cancel() arriving right now (see cancel)
                if self._cancel.is_set():  # cancelled after the last check: still no result
                    raise self.cancel_errors[0]("Cancelled; nothing was produced.")
                self._result = result
        except BaseException as exc:  # handed to wait(); a thread must not die silently
            self._error = exc
        finally:
            self._events.put((1.0, "finished") if self._error is None else
                             (1.0, "cancelled" if self._is_cancel(self._error) else "failed"))

    def _on_progress(self, fraction: float, message: str):
        self._events.put((float(fraction), str(message)))

    def _is_cancel(self, exc) -> bool:
        return isinstance(exc, self.cancel_errors)

    # --- caller side ---------------------------------------------------------------------------
    def start(self):
        with self._lock:
            if self._thread is not None:
                raise RuntimeError("This job has already been started; make a new one.")
            self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
            self._thread.start()
        return self

    def cancel(self) -> None:
        """Ask the run to stop at its next check (returns at once). A run that has just finished
        but whose result nobody has taken yet is cancelled too: its result is dropped. After
        wait() has returned the result, this does nothing."""
        with self._lock:
            if self._delivered:
                return
            self._cancel.set()
            if self._result is not None:
                self._result = None
                self._error = self.cancel_errors[0]("Cancelled; the result was discarded.")

    def wait(self, timeout: float | None = None):
        """Block until the run ends; return its result or raise its error. TimeoutError if it is
        still running after `timeout` seconds."""
        if self._thread is None:
            raise RuntimeError("The job was not started; call start() first.")
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"The job is still running after {timeout} s.")
        with self._lock:
            if self._error is not None:
                raise self._error
            self._delivered = True
            return self._result

    def poll_events(self) -> list[tuple[float, str]]:
        """Progress events (fraction, message) since the last poll; never blocks."""
        events = []
        while True:
            try:
                events.append(self._events.get_nowait())
            except queue.Empty:
                return events

    @property
    def cancel_requested(self) -> bool:
        return self._cancel.is_set()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def done(self) -> bool:
        return self._thread is not None and not self._thread.is_alive()

    @property
    def cancelled(self) -> bool:
        return self.done and self._is_cancel(self._error)

    @property
    def result(self):
        return self._result if self.done else None

    @property
    def error(self) -> BaseException | None:
        return self._error if self.done else None


def call_interruptibly(function: Callable[[], Any], cancel_event: threading.Event, poll_s: float = 0.05,
                       cancel_error: type[BaseException] = CancelledError, name: str = "loader"):
    """function() in a helper thread, returning its result; a cancel stops the wait at once.

    For steps that cannot check a cancel flag themselves (loading a Keras model takes seconds):
    on cancel the helper thread is left to finish on its own (its result is dropped, or kept by
    the function's own cache) and cancel_error is raised now."""
    box: dict[str, Any] = {}
    finished = threading.Event()

    def call():
        try:
            box["result"] = function()
        except BaseException as exc:
            box["error"] = exc
        finally:
            finished.set()

    threading.Thread(target=call, name=name, daemon=True).start()
    while not finished.wait(poll_s):
        if cancel_event.is_set():
            raise cancel_error("Cancelled while loading; nothing was produced.")
    if "error" in box:
        raise box["error"]
    return box["result"]
