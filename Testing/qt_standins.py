"""Stand-ins for Slicer's own widget classes, for the panel tests on real Qt (PySide6, offscreen).

Not a test file. The Slicer application is not available in CI, so the classes a module's .ui uses
are replaced by the smallest honest stand-ins (registered with QUiLoader under the same names):

- qMRMLWidget: a QWidget whose setMRMLScene() emits mrmlSceneChanged and hands the scene to its
  node selectors (what the .ui's mrmlSceneChanged -> setMRMLScene connections do in Slicer).
- qMRMLNodeComboBox: a QComboBox listing the scene's nodes of `nodeTypes` (subclasses only with
  showChildNodeTypes), an optional "none" entry, currentNode()/setCurrentNode(), and the signal
  currentNodeChanged(node); it refreshes when nodes are added to or removed from the real scene.
- qMRMLCheckableNodeComboBox: the same with checkable items, checkedNodes(), checkedNodesChanged.
- ctkCollapsibleButton: a QGroupBox whose `text` is its title and `collapsed` hides its content.
- ctkPathLineEdit: a line edit with the currentPath property and currentPathChanged signal.
- ctkSliderWidget: a slider + spin box with float minimum/maximum/singleStep/value and valueChanged.
- qt_shim(): the PySide6 QtCore/QtGui/QtWidgets names in one module, as PythonQt's `qt` has them.
"""
from __future__ import annotations

import os
import time
import types

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from PySide6 import QtCore, QtGui, QtWidgets  # noqa: E402
from PySide6.QtCore import Property, Signal  # noqa: E402


class qMRMLWidget(QtWidgets.QWidget):
    mrmlSceneChanged = Signal(object)

    def setMRMLScene(self, scene):
        self.mrmlSceneChanged.emit(scene)
        for child in self.findChildren(qMRMLNodeComboBox):
            child.setMRMLScene(scene)


class qMRMLNodeComboBox(QtWidgets.QComboBox):
    currentNodeChanged = Signal(object)

    def __init__(self, parent=None):
        super().__init__(parent)
        self._scene = None
        self._observers = []
        self._nodes = []
        self._nodeTypes = []
        self._noneEnabled = False
        self._noneDisplay = "None"
        self._showChild = True
        self._flags = {}
        self.setSizeAdjustPolicy(QtWidgets.QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.currentIndexChanged.connect(self._onIndexChanged)

    def _get_types(self):
        return list(self._nodeTypes)

    def _set_types(self, value):
        self._nodeTypes = list(value)
        self._refresh()

    nodeTypes = Property("QStringList", _get_types, _set_types)

    def _get_none(self):
        return self._noneEnabled

    def _set_none(self, value):
        self._noneEnabled = bool(value)
        self._refresh()

    noneEnabled = Property(bool, _get_none, _set_none)

    def _get_none_display(self):
        return self._noneDisplay

    def _set_none_display(self, value):
        self._noneDisplay = str(value)
        self._refresh()

    noneDisplay = Property(str, _get_none_display, _set_none_display)

    def _get_child(self):
        return self._showChild

    def _set_child(self, value):
        self._showChild = bool(value)
        self._refresh()

    showChildNodeTypes = Property(bool, _get_child, _set_child)

    def _flag(name):  # noqa: N805  (class-body helper)
        return Property(bool, lambda self: self._flags.get(name, False),
                        lambda self, v: self._flags.__setitem__(name, bool(v)))

    addEnabled = _flag("addEnabled")
    removeEnabled = _flag("removeEnabled")
    renameEnabled = _flag("renameEnabled")
    del _flag

    def setMRMLScene(self, scene):
        if self._scene is not None:
            for tag in self._observers:
                self._scene.RemoveObserver(tag)
        self._scene = scene
        self._observers = [scene.AddObserver(event, lambda *a: self._refresh())
                           for event in (scene.NodeAddedEvent, scene.NodeRemovedEvent)] if scene else []
        self._refresh()

    def _matching(self):
        if self._scene is None:
            return []
        nodes = []
        for i in range(self._scene.GetNumberOfNodes()):
            node = self._scene.GetNthNode(i)
            if node.GetHideFromEditors():
                continue
            if any(node.GetClassName() == t or (self._showChild and node.IsA(t)) for t in self._nodeTypes):
                nodes.append(node)
        return nodes

    def _refresh(self):
        current = self.currentNode()
        entries = ([None] if self._noneEnabled else []) + self._matching()
        self.blockSignals(True)
        self.clear()
        for node in entries:
            self.addItem(self._noneDisplay if node is None else node.GetName())
        self._nodes = entries
        index = entries.index(current) if current in entries else (0 if entries else -1)
        self.setCurrentIndex(index)
        self.blockSignals(False)
        if self.currentNode() is not current:
            self.currentNodeChanged.emit(self.currentNode())

    def _onIndexChanged(self, index):
        self.currentNodeChanged.emit(self.currentNode())

    def currentNode(self):
        index = self.currentIndex()
        return self._nodes[index] if 0 <= index < len(self._nodes) else None

    def currentNodeID(self):
        node = self.currentNode()
        return node.GetID() if node else ""

    def setCurrentNode(self, node):
        if node not in self._nodes:
            self._refresh()
        if node in self._nodes:
            self.setCurrentIndex(self._nodes.index(node))

    def nodeCount(self):
        return len([n for n in self._nodes if n is not None])

    def nodeFromIndex(self, i):
        return [n for n in self._nodes if n is not None][i]


class qMRMLCheckableNodeComboBox(qMRMLNodeComboBox):
    checkedNodesChanged = Signal()

    def __init__(self, parent=None):
        self._checked = []
        super().__init__(parent)
        self.view().pressed.connect(self._onPressed)

    def _refresh(self):
        super()._refresh()
        model = self.model()
        for i, node in enumerate(self._nodes):
            item = model.item(i)
            item.setFlags(QtCore.Qt.ItemFlag.ItemIsEnabled | QtCore.Qt.ItemFlag.ItemIsUserCheckable)
            item.setCheckState(QtCore.Qt.CheckState.Checked if node in self._checked else QtCore.Qt.CheckState.Unchecked)

    def _onPressed(self, index):
        node = self._nodes[index.row()]
        self.setCheckState(node, QtCore.Qt.CheckState.Unchecked if node in self._checked else QtCore.Qt.CheckState.Checked)

    def setCheckState(self, node, state):
        checked = state == QtCore.Qt.CheckState.Checked
        if checked and node not in self._checked:
            self._checked.append(node)
        elif not checked and node in self._checked:
            self._checked.remove(node)
        self._refresh()
        self.checkedNodesChanged.emit()

    def checkedNodes(self):
        return [n for n in self._nodes if n in self._checked]  # in the list's order, like Slicer's


class ctkCollapsibleButton(QtWidgets.QGroupBox):
    def __init__(self, parent=None):
        super().__init__(parent)
        self._collapsed = False

    text = Property(str, lambda self: self.title(), lambda self, v: self.setTitle(v))

    def _set_collapsed(self, value):
        self._collapsed = bool(value)
        self._apply()

    collapsed = Property(bool, lambda self: self._collapsed, _set_collapsed)

    def _apply(self):
        for child in self.findChildren(QtWidgets.QWidget, options=QtCore.Qt.FindChildOption.FindDirectChildrenOnly):
            child.setVisible(not self._collapsed)
        self.setTitle(("\u25b8 " if self._collapsed else "\u25be ") + self.title().lstrip("\u25b8\u25be "))

    def showEvent(self, event):
        self._apply()
        super().showEvent(event)


class ctkPathLineEdit(QtWidgets.QWidget):
    currentPathChanged = Signal(str)

    def __init__(self, parent=None):
        super().__init__(parent)
        layout = QtWidgets.QHBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        self._edit = QtWidgets.QLineEdit(self)
        self._button = QtWidgets.QToolButton(self)
        self._button.setText("...")
        layout.addWidget(self._edit, 1)
        layout.addWidget(self._button)
        self._filters = []
        self._edit.textChanged.connect(self.currentPathChanged)

    currentPath = Property(str, lambda self: self._edit.text(), lambda self, v: self._edit.setText(v))
    nameFilters = Property("QStringList", lambda self: self._filters, lambda self, v: setattr(self, "_filters", list(v)))

    def setCurrentPath(self, path):
        self._edit.setText(path)


class ctkSliderWidget(QtWidgets.QWidget):
    valueChanged = Signal(float)
    _STEPS = 1000

    def __init__(self, parent=None):
        super().__init__(parent)
        layout = QtWidgets.QHBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        self._slider = QtWidgets.QSlider(QtCore.Qt.Orientation.Horizontal, self)
        self._slider.setRange(0, self._STEPS)
        self._spin = QtWidgets.QDoubleSpinBox(self)
        self._spin.setDecimals(2)
        layout.addWidget(self._slider, 1)
        layout.addWidget(self._spin)
        self._spin.valueChanged.connect(self._fromSpin)
        self._slider.valueChanged.connect(
            lambda v: self._spin.setValue(self._spin.minimum() + v / self._STEPS * (self._spin.maximum() - self._spin.minimum())))

    def _fromSpin(self, value):
        span = self._spin.maximum() - self._spin.minimum() or 1.0
        self._slider.blockSignals(True)
        self._slider.setValue(int(round((value - self._spin.minimum()) / span * self._STEPS)))
        self._slider.blockSignals(False)
        self.valueChanged.emit(value)

    minimum = Property(float, lambda self: self._spin.minimum(), lambda self, v: self._spin.setMinimum(v))
    maximum = Property(float, lambda self: self._spin.maximum(), lambda self, v: self._spin.setMaximum(v))
    singleStep = Property(float, lambda self: self._spin.singleStep(), lambda self, v: self._spin.setSingleStep(v))
    pageStep = Property(float, lambda self: 0.1, lambda self, v: None)
    value = Property(float, lambda self: self._spin.value(), lambda self, v: self._spin.setValue(v))

    def setValue(self, v):
        self._spin.setValue(v)


STAND_INS = (qMRMLWidget, qMRMLNodeComboBox, qMRMLCheckableNodeComboBox, ctkCollapsibleButton, ctkPathLineEdit,
             ctkSliderWidget)


def qt_shim():
    qt = types.ModuleType("qt")
    for mod in (QtCore, QtGui, QtWidgets):
        for name in dir(mod):
            if not name.startswith("_"):
                setattr(qt, name, getattr(mod, name))
    return qt


def load_ui(path):
    from PySide6.QtUiTools import QUiLoader

    loader = QUiLoader()
    for cls in STAND_INS:
        loader.registerCustomWidget(cls)
    widget = loader.load(str(path))
    assert widget is not None, loader.errorString()
    return widget


def child_widget_variables(widget):
    return types.SimpleNamespace(**{c.objectName(): c for c in widget.findChildren(QtCore.QObject) if c.objectName()})



def spin_until(condition, timeout=60.0):
    app = QtWidgets.QApplication.instance()
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise TimeoutError("condition not met in time")
        app.processEvents(QtCore.QEventLoop.ProcessEventsFlag.AllEvents, 20)
        time.sleep(0.005)




def dispose(widget):
    """Tear a module widget down now: its cleanup, then delete its Qt panel and collect the Python
    wrappers while the QApplication is alive. Left to deleteLater alone, the deletion waited for an
    event loop that never came and the wrappers were freed by a garbage collection in a later,
    unrelated test, which crashed the interpreter now and then."""
    import gc

    widget.cleanup()
    widget.parent.deleteLater()
    QtCore.QCoreApplication.sendPostedEvents(None, QtCore.QEvent.Type.DeferredDelete)
    gc.collect()
