"""ROI statistics in the Slicer Logic (real MRML of slicer-core) equal OEFPredictorLib.roistats on
the same arrays: labelmap, segmentation (segments resampled onto the map) and markups ROI box."""
from __future__ import annotations

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")

from slicer_testing import slicer_scene  # noqa: E402

import OEFPredictor as module  # noqa: E402
from OEFPredictorLib import roistats  # noqa: E402

M = np.diag([-2.0, -2.0, 3.0, 1.0])
M[:3, 3] = (10.0, 20.0, -5.0)


@pytest.fixture()
def case():
    env = slicer_scene()
    rng = np.random.default_rng(3)
    shape = (8, 10, 12)
    oef = rng.uniform(20, 60, shape).astype(np.float32)
    truth = (oef + rng.normal(0, 3, shape)).astype(np.float32)
    labels = np.zeros(shape, np.int16)
    labels[1:4, 2:6, 2:6] = 1
    labels[4:7, 5:9, 6:11] = 2
    labels[0, 0, 0] = 3  # a single-voxel ROI
    oefNode = slicer.util.addVolumeFromArray(oef, M, "OEF")
    truthNode = slicer.util.addVolumeFromArray(truth, M, "truth OEF")
    labelNode = slicer.util.addVolumeFromArray(labels, M, "labels", nodeClassName="vtkMRMLLabelMapVolumeNode")
    return env, oef, truth, labels, oefNode, truthNode, labelNode


def _table_rows(tableNode):
    table = tableNode.GetTable()
    rows = []
    for r in range(table.GetNumberOfRows()):
        rows.append({table.GetColumnName(c): table.GetValue(r, c).ToString() if table.GetColumnName(c) in roistats.TEXT_COLUMNS
                     else table.GetValue(r, c).ToDouble() for c in range(table.GetNumberOfColumns())})
    return rows


def _assert_rows_equal(table_rows, expected):
    assert len(table_rows) == len(expected)
    for got, want in zip(table_rows, expected):
        for column in roistats.COLUMNS:
            if column in roistats.TEXT_COLUMNS:
                assert got[column] == (want[column] or ""), column
            else:
                np.testing.assert_allclose(got[column], float(want[column]), rtol=1e-12, equal_nan=True, err_msg=column)


def test_labelmap_table_equals_library_and_rerun_updates(case):
    env, oef, truth, labels, oefNode, truthNode, labelNode = case
    logic = module.OEFPredictorLogic()
    table = logic.computeRoiStatistics({"OEF": oefNode}, labelNode, referenceNodes={"OEF": truthNode})
    expected = roistats.roi_statistics({"OEF": oef.astype(np.float64)}, roistats.rois_from_labels(labels),
                                       roistats.voxel_volume_ml((2.0, 2.0, 3.0)),
                                       reference={"OEF": truth.astype(np.float64)}, units={"OEF": "%"})
    rows = _table_rows(table)
    assert [r["roi"] for r in rows] == ["label_1", "label_2", "label_3"]
    _assert_rows_equal(rows, expected)
    n_tables = env.scene.GetNumberOfNodesByClass("vtkMRMLTableNode")
    again = logic.computeRoiStatistics({"OEF": oefNode}, labelNode, referenceNodes={"OEF": truthNode}, tableNode=table)
    assert again is table and env.scene.GetNumberOfNodesByClass("vtkMRMLTableNode") == n_tables
    assert table.GetTable().GetNumberOfRows() == 3


def test_segmentation_and_box_rois(case):
    env, oef, truth, labels, oefNode, truthNode, labelNode = case
    seg = env.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "segs")
    env.segLogic.ImportLabelmapToSegmentationNode(labelNode, seg)
    logic = module.OEFPredictorLogic()
    rois = logic.roisFromNode(seg, oefNode)
    assert len(rois) == 3
    for roi, value in zip(rois.values(), (1, 2, 3)):
        np.testing.assert_array_equal(roi, labels == value)
    table = logic.computeRoiStatistics({"OEF": oefNode}, seg)
    assert table.GetTable().GetNumberOfRows() == 3

    box = env.scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "box")
    box.SetCenter(0.0, 10.0, 0.0)
    box.SetSize(8.0, 8.0, 7.0)
    roi = logic.roisFromNode(box, oefNode)["box"]
    expected = roistats.box_roi(oef.shape, M, (0.0, 10.0, 0.0), (8.0, 8.0, 7.0))
    assert roi.any()
    np.testing.assert_array_equal(roi, expected)


def test_difference_map_diverging(case):
    env, oef, truth, labels, oefNode, truthNode, labelNode = case
    diff = module.OEFPredictorLogic().differenceMap(oefNode, truthNode)
    np.testing.assert_allclose(slicer.util.arrayFromVolume(diff), oef - truth, atol=1e-5)
    display = diff.GetDisplayNode()
    assert "diverging" in env.scene.GetNodeByID(display.GetColorNodeID()).GetName().lower()
    assert display.GetWindowLevelMin() == pytest.approx(-display.GetWindowLevelMax())
