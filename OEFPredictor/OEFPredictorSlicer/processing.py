"""The panel side of a background job, shared by both modules.

One explicit processing state drives the Apply/Cancel button and the progress bar:

    IDLE --Apply--> INSTALLING (packages, main thread) --> RUNNING --Cancel--> CANCELLING --> IDLE
                                                             '------- done ------------------'

JobController polls the job (anything with poll_events(), done and cancel(), e.g.
OEFPredictorLib.jobs.BackgroundJob) from a QTimer on the main thread and hands the finished job
to the panel's callback; the worker thread never touches Qt or MRML.
"""
from __future__ import annotations

import enum

from . import compat
from .compat import _


class ProcessingState(enum.Enum):
    IDLE = "idle"
    INSTALLING = "installing"
    RUNNING = "running"
    CANCELLING = "cancelling"


class JobController:
    """Apply/Cancel button, progress bar and status label of one panel, and the job it runs.

    onFinished(job) is called on the main thread once the job is done (then the state is IDLE
    again); onIdle() when the panel should re-check whether Apply can run."""

    POLL_INTERVAL_MS = 100

    def __init__(self, applyButton, progressBar, statusLabel, onFinished, onIdle=None):
        self.applyButton = applyButton
        self.progressBar = progressBar
        self.statusLabel = statusLabel
        self.onFinished = onFinished
        self.onIdle = onIdle or (lambda: None)
        self.job = None
        self.state = ProcessingState.IDLE
        self.timer = compat.qt.QTimer()
        self.timer.setInterval(self.POLL_INTERVAL_MS)
        self.timer.timeout.connect(self.poll)
        self.setState(ProcessingState.IDLE)

    @property
    def busy(self) -> bool:
        return self.state is not ProcessingState.IDLE

    def setState(self, state: ProcessingState):
        self.state = state
        busy = state is not ProcessingState.IDLE
        self.applyButton.setText(_("Cancel") if state in (ProcessingState.RUNNING, ProcessingState.CANCELLING)
                                 else _("Apply"))
        self.applyButton.setEnabled(state is ProcessingState.RUNNING or not busy)
        if state is ProcessingState.RUNNING:
            self.applyButton.setToolTip(_("Stop the computation; nothing is written."))
        self.progressBar.setVisible(busy)
        if state is ProcessingState.INSTALLING:
            self.statusLabel.setText(_("Checking and installing the Python packages..."))
        if state is ProcessingState.IDLE:
            self.onIdle()

    def start(self, job):
        """Show and poll an already started job."""
        self.job = job
        self.progressBar.setValue(0)
        self.statusLabel.setText(_("Starting..."))
        self.setState(ProcessingState.RUNNING)
        self.timer.start()

    def cancel(self, message=None):
        if self.job is None or self.state is not ProcessingState.RUNNING:
            return
        self.job.cancel()
        self.statusLabel.setText(message or _("Cancelling..."))
        self.setState(ProcessingState.CANCELLING)

    def poll(self):
        job = self.job
        if job is None:
            self.timer.stop()
            return
        for fraction, message in job.poll_events():
            self.progressBar.setValue(int(round(100 * fraction)))
            if message and self.state is ProcessingState.RUNNING:
                self.statusLabel.setText(message)
        if not job.done:
            return
        self.timer.stop()
        self.job = None
        try:
            self.onFinished(job)
        finally:
            self.setState(ProcessingState.IDLE)

    def stop(self):
        """Module cleanup or scene close: cancel what runs and stop polling."""
        if self.job is not None:
            self.job.cancel()
        self.timer.stop()
