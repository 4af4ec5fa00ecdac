"""Imports that exist only inside the Slicer application, guarded in one place for both modules.

Inside Slicer all of these are the real thing. Under the slicer-core wheel (CI: real MRML, no Qt,
no application) the minimal fallbacks below let a module file be imported and its Logic tested;
Slicer never uses them. IN_SLICER_APP says which case this is.
"""
from __future__ import annotations

import logging

try:
    import qt  # PythonQt in Slicer; a widget test may put a PySide6-based shim here
except ImportError:  # slicer-core wheel: no Qt at all
    qt = None

try:
    from slicer.i18n import tr as _
    from slicer.i18n import translate
except ImportError:  # outside the application: no translation

    def _(text):
        return text

    def translate(context, text):
        return text

try:
    from slicer.util import VTKObservationMixin
except ImportError:  # no slicer package at all (plain Python)

    class VTKObservationMixin:
        def __init__(self):
            pass

        def removeObservers(self, *args):
            pass

try:
    from slicer.ScriptedLoadableModule import (
        ScriptedLoadableModule,
        ScriptedLoadableModuleLogic,
        ScriptedLoadableModuleTest,
        ScriptedLoadableModuleWidget,
    )

    IN_SLICER_APP = True
except ImportError:
    IN_SLICER_APP = False

    class ScriptedLoadableModule:  # fallback outside the Slicer application only
        def __init__(self, parent=None):
            self.parent = parent

    class ScriptedLoadableModuleLogic:  # fallback outside the Slicer application only
        def __init__(self, parent=None):
            self.parent = parent

        def getParameterNode(self):
            return None

    class ScriptedLoadableModuleTest:  # fallback outside the Slicer application only
        def delayDisplay(self, message, msec=0):
            logging.info(message)

    class ScriptedLoadableModuleWidget:  # fallback outside the Slicer application only (needs qt)
        def __init__(self, parent=None):
            if parent is None:
                parent = qt.QWidget()
                parent.setLayout(qt.QVBoxLayout())
            self.parent = parent
            self.layout = parent.layout()

        def setup(self):
            pass

        def cleanup(self):
            pass

try:
    from slicer.parameterNodeWrapper import Choice, Default, WithinRange, parameterNodeWrapper
except ImportError:  # slicer-core wheel: the panel (and its parameter node) exists only in the app
    parameterNodeWrapper = Choice = Default = WithinRange = None


def qtProperty(widget, name):
    """A Qt property's value: PythonQt (Slicer) exposes properties as attributes (widget.text),
    PySide6 (the widget tests) as getter methods (widget.text()); this reads both."""
    value = getattr(widget, name)
    return value() if callable(value) else value


def showError(message):
    """An error dialog in the application; elsewhere (tests, scripts) only the log."""
    if IN_SLICER_APP:
        import slicer

        slicer.util.errorDisplay(message)
    else:
        logging.error(message)
