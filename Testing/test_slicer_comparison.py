"""Comparison with a reference map in the Slicer Logic, against the real MRML of slicer-core:

- segments whose geometry differs from the maps' (a labelmap segment on a coarser, rotated,
  shifted grid; a closed-surface segment) come out as the expected voxels of the maps' grid,
  computed independently in numpy;
- the Slicer table equals the `oefpredictor stats` command's CSV on the same inputs written to files
  (the command run as a separate process), and the table's CSV export is that same file;
- the comparison layout (three linked slice views: prediction, reference, difference) and the
  scatter / Bland-Altman plot chart nodes, updated (not duplicated) on reruns.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
vtk = pytest.importorskip("vtk")

from slicer_testing import ijk_to_ras, scene_node_ids, slicer_scene  # noqa: E402

import OEFPredictor as module  # noqa: E402
from OEFPredictorLib import io, roistats  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
M = np.diag([-2.0, -2.0, 3.0, 1.0])
M[:3, 3] = (10.0, 20.0, -5.0)
SHAPE = (8, 10, 12)


def _voxel_centres_ras(shape, ijk_to_ras_matrix):
    k, j, i = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    ijk = np.stack([i.ravel(), j.ravel(), k.ravel(), np.ones(i.size)])
    return (ijk_to_ras_matrix @ ijk)[:3]


@pytest.fixture()
def env():
    return slicer_scene()


def test_labelmap_segment_on_a_coarse_rotated_grid_is_resampled_onto_the_maps_grid(env):
    volume = slicer.util.addVolumeFromArray(np.zeros(SHAPE, np.float32), M, "OEF")
    angle = np.deg2rad(20.0)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0.0], [np.sin(angle), np.cos(angle), 0.0], [0.0, 0.0, 1.0]])
    coarse = np.eye(4)
    coarse[:3, :3] = rotation @ np.diag([3.1, 2.9, 4.3])  # coarser, anisotropic, rotated
    coarse[:3, 3] = (-6.3, 1.7, -3.1)  # shifted by fractions of a voxel
    coarse_shape = (6, 9, 9)
    labels = np.zeros(coarse_shape, np.uint8)
    labels[1:4, 2:6, 1:5] = 1
    labels[2:5, 0:3, 0:3] = 2
    labelNode = slicer.util.addVolumeFromArray(labels, coarse, "coarse labels", nodeClassName="vtkMRMLLabelMapVolumeNode")
    seg = env.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "drawn elsewhere")
    env.segLogic.ImportLabelmapToSegmentationNode(labelNode, seg)
    seg.GetSegmentation().GetNthSegment(0).SetName("lesion")
    seg.GetSegmentation().GetNthSegment(1).SetName("other")

    rois = module.OEFPredictorLogic().roisFromNode(seg, volume)

    # Expected, independently: the coarse voxel whose box holds each fine voxel's centre.
    continuous = (np.linalg.inv(coarse) @ np.vstack([_voxel_centres_ras(SHAPE, M), np.ones(int(np.prod(SHAPE)))]))[:3]
    assert np.min(np.abs(np.abs(continuous - np.round(continuous)) - 0.5)) > 1e-3  # no ties at voxel borders
    index = np.floor(continuous + 0.5).astype(int)
    inside = np.all((index >= 0) & (index < np.array(coarse_shape[::-1])[:, None]), axis=0)
    expected = np.zeros(index.shape[1], np.uint8)
    expected[inside] = labels[index[2, inside], index[1, inside], index[0, inside]]
    expected = expected.reshape(SHAPE)
    assert list(rois) == ["lesion", "other"]
    for name, value in (("lesion", 1), ("other", 2)):
        assert rois[name].shape == SHAPE
        assert (expected == value).sum() > 50
        np.testing.assert_array_equal(rois[name], expected == value, err_msg=name)


def test_closed_surface_segment_is_rasterized_on_the_maps_grid(env):
    """A sphere given as a closed surface, in a segmentation whose own reference geometry is a
    coarse 4x4x6 mm grid: converting through that grid and resampling moves the border by up to a
    coarse voxel; the Logic rasterizes the surface on the maps' grid (voxel centre inside)."""
    volume = slicer.util.addVolumeFromArray(np.zeros(SHAPE, np.float32), M, "OEF")
    coarseM = np.diag([-4.0, -4.0, 6.0, 1.0])
    coarseM[:3, 3] = (10.0, 20.0, -5.0)
    coarseVolume = slicer.util.addVolumeFromArray(np.zeros((4, 5, 6), np.float32), coarseM, "coarse series")
    centre, radius = np.array([-1.02, 10.91, 5.13]), 6.8
    sphere = vtk.vtkSphereSource()
    sphere.SetCenter(*centre)
    sphere.SetRadius(radius)
    sphere.SetThetaResolution(64)
    sphere.SetPhiResolution(64)
    sphere.Update()
    seg = env.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "surface")
    seg.GetSegmentation().SetSourceRepresentationName("Closed surface")
    seg.SetReferenceImageGeometryParameterFromVolumeNode(coarseVolume)
    seg.AddSegmentFromClosedSurfaceRepresentation(sphere.GetOutput(), "ball", [1.0, 0.0, 0.0])
    before = scene_node_ids(env.scene)
    geometry = seg.GetSegmentation().GetConversionParameter("Reference image geometry")

    roi = module.OEFPredictorLogic().roisFromNode(seg, volume)["ball"]

    distance = np.linalg.norm(_voxel_centres_ras(SHAPE, M) - centre[:, None], axis=0).reshape(SHAPE)
    expected = distance <= radius
    # a 64x64 polygonal sphere lies within 0.01 mm of the true one; no voxel centre is within 0.1 mm
    assert np.min(np.abs(distance - radius)) > 0.1
    assert expected.sum() > 100
    np.testing.assert_array_equal(roi, expected)
    # the user's segmentation and the scene are left as they were
    assert scene_node_ids(env.scene) == before
    assert seg.GetSegmentation().GetSourceRepresentationName() == "Closed surface"
    assert seg.GetSegmentation().GetConversionParameter("Reference image geometry") == geometry


@pytest.fixture()
def files_case(env, tmp_path):
    """The same inputs as MRML nodes and as NRRD files (with the BIDS dseg.tsv of ROI names). NRRD, not
    NIfTI: ITK's NIfTI reader turns NaN voxels into 0, and the NaN handling must be compared too."""
    geometry = io.Geometry(spacing=(2.0, 2.0, 3.0), origin=(-10.0, -20.0, -5.0))
    m = ijk_to_ras(geometry)
    rng = np.random.default_rng(8)
    oef = rng.uniform(20, 60, SHAPE).astype(np.float32)
    oef[rng.random(SHAPE) < 0.03] = np.nan  # NaNs are excluded, the same way on both sides
    r2 = rng.uniform(5, 25, SHAPE).astype(np.float32)
    truth = (np.nan_to_num(oef, nan=40.0) + rng.normal(0, 3, SHAPE)).astype(np.float32)
    truth_r2 = (r2 + rng.normal(0, 1, SHAPE)).astype(np.float32)
    labels = np.zeros(SHAPE, np.int16)
    labels[1:4, 2:6, 2:6] = 1
    labels[1:4, 2:6, 7:11] = 2
    labels[4:8, 0:10, 0:12] = 3
    labels[0, 0, 0] = 4  # a single voxel, outside the mask
    mask = np.zeros(SHAPE, np.uint8)
    mask[:, 1:, :] = 1
    names = {1: "lesion", 2: "contralateral_lesion", 3: "deep", 4: "dot"}

    pred_dir, truth_dir = tmp_path / "pred", tmp_path / "truth"
    pred_dir.mkdir()
    truth_dir.mkdir()
    io.write_volume(oef, geometry, pred_dir / "oef.nrrd")
    io.write_volume(r2, geometry, pred_dir / "R2.nrrd")
    io.write_volume(truth, geometry, truth_dir / "oef.nrrd")
    io.write_volume(truth_r2, geometry, truth_dir / "R2.nrrd")
    io.write_volume(labels, geometry, tmp_path / "rois_dseg.nrrd", dtype=np.int16)
    io.write_volume(mask, geometry, tmp_path / "mask.nrrd", dtype=np.uint8)
    (tmp_path / "rois_dseg.tsv").write_text("index\tname\n" + "".join(f"{k}\t{v}\n" for k, v in names.items()))

    nodes = {"OEF": slicer.util.addVolumeFromArray(oef, m, "OEF"), "R2": slicer.util.addVolumeFromArray(r2, m, "R2")}
    refs = {"OEF": slicer.util.addVolumeFromArray(truth, m, "truth OEF"),
            "R2": slicer.util.addVolumeFromArray(truth_r2, m, "truth R2")}
    maskNode = slicer.util.addVolumeFromArray(mask, m, "mask", nodeClassName="vtkMRMLLabelMapVolumeNode")
    labelNode = slicer.util.addVolumeFromArray(labels, m, "rois", nodeClassName="vtkMRMLLabelMapVolumeNode")
    seg = env.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "rois")
    env.segLogic.ImportLabelmapToSegmentationNode(labelNode, seg)
    for i, value in enumerate(sorted(names)):
        seg.GetSegmentation().GetNthSegment(i).SetName(names[value])
    return {"dir": tmp_path, "nodes": nodes, "refs": refs, "mask": maskNode, "seg": seg, "names": names}


def test_slicer_table_equals_the_command_line(files_case, tmp_path):
    d = files_case["dir"]
    out_csv = tmp_path / "cli" / "stats.csv"
    command = [sys.executable, "-m", "OEFPredictorLib.cli", "stats",
               "--map", str(d / "pred" / "oef.nrrd"), str(d / "pred" / "R2.nrrd"),
               "--labels", str(d / "rois_dseg.nrrd"), "--mask", str(d / "mask.nrrd"),
               "--truth", str(d / "truth" / "oef.nrrd"), str(d / "truth" / "R2.nrrd"), "--out", str(out_csv)]
    env = dict(os.environ, PYTHONPATH=str(REPO / "OEFPredictor"))
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    cli_rows = roistats.read_csv(out_csv)

    logic = module.OEFPredictorLogic()
    table = logic.computeRoiStatistics(files_case["nodes"], files_case["seg"], referenceNodes=files_case["refs"],
                                       maskNode=files_case["mask"])
    slicer_rows = logic.tableRows(table)
    assert [(r["roi"], r["map"]) for r in slicer_rows] == [(r["roi"], r["map"]) for r in cli_rows]
    assert [r["roi"] for r in slicer_rows[::2]] == ["lesion", "contralateral_lesion", "deep", "dot"]
    assert any(r["n_nonfinite"] for r in cli_rows), [(r["n_nonfinite"], r["n_outside_mask"], r["n_valid"]) for r in cli_rows]
    assert any(r["n_outside_mask"] for r in cli_rows)
    assert any(np.isfinite(r["cnr"]) for r in cli_rows)  # the lesion / contralateral pair on both sides
    for got, want in zip(slicer_rows, cli_rows):
        for column in roistats.COLUMNS:
            if column in roistats.TEXT_COLUMNS or column in roistats.INT_COLUMNS:
                assert got[column] == want[column], (want["roi"], want["map"], column)
            else:
                np.testing.assert_allclose(got[column], want[column], rtol=1e-12, atol=0, equal_nan=True,
                                           err_msg=f"{want['roi']} {want['map']} {column}")

    # the table's CSV export is the command line's file, byte for byte
    exported = logic.exportTableToCsv(table, tmp_path / "slicer" / "stats.csv")
    assert exported.read_bytes() == out_csv.read_bytes()


def test_csv_export_is_atomic_and_refuses_bad_targets(files_case, tmp_path, monkeypatch):
    logic = module.OEFPredictorLogic()
    table = logic.computeRoiStatistics(files_case["nodes"], files_case["seg"])
    out = tmp_path / "out"
    out.mkdir()
    target = out / "stats.csv"
    target.write_text("old contents\n")

    def broken_writer(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(roistats.csv, "writer", broken_writer)
    with pytest.raises(OSError):
        logic.exportTableToCsv(table, target)
    assert target.read_text() == "old contents\n"  # untouched, and no partial file beside it
    assert sorted(p.name for p in out.iterdir()) == ["stats.csv"]
    monkeypatch.undo()
    logic.exportTableToCsv(table, target)
    assert len(roistats.read_csv(target)) == 8
    with pytest.raises(module.InputError):
        logic.exportTableToCsv(table, out)
    with pytest.raises(module.InputError):
        logic.exportTableToCsv(slicer.mrmlScene.AddNewNodeByClass("vtkMRMLTableNode"), tmp_path / "empty.csv")


def _column(tableNode, name):
    return slicer.util.arrayFromTableColumn(tableNode, name).astype(np.float64)


def test_plots_layout_and_reruns_update_the_same_nodes(files_case):
    env = module.slicer.mrmlScene
    nodes, refs, seg, maskNode = files_case["nodes"], files_case["refs"], files_case["seg"], files_case["mask"]
    logic = module.OEFPredictorLogic()
    result = logic.compareWithReference(nodes, seg, refs["OEF"], maskNode=maskNode, showLayout=True, maxPoints=100)

    # plot data: the ROI union inside the mask, finite pairs; a bounded subsample, said in the title
    oef = slicer.util.arrayFromVolume(nodes["OEF"]).astype(np.float64)
    truth = slicer.util.arrayFromVolume(refs["OEF"]).astype(np.float64)
    inside = slicer.util.arrayFromVolume(maskNode) > 0
    union = np.zeros(oef.shape, bool)
    for roi in logic.roisFromNode(seg, nodes["OEF"]).values():
        union |= roi
    selected = union & inside & np.isfinite(oef) & np.isfinite(truth)
    n_pairs = int(selected.sum())
    assert result["nPairs"] == n_pairs > 100 and result["nShown"] == 100
    points = result["table"]
    pred, ref = _column(points, "prediction"), _column(points, "reference")
    assert pred.size == 100
    pairs = set(zip(oef[selected].tolist(), truth[selected].tolist()))
    assert set(zip(pred.tolist(), ref.tolist())) <= pairs  # every drawn point is a real voxel pair
    np.testing.assert_allclose(_column(points, "difference"), pred - ref)
    np.testing.assert_allclose(_column(points, "mean"), (pred + ref) / 2)
    assert "100 of {:,}".format(n_pairs) in result["scatterChart"].GetTitle()
    # Bland-Altman lines from all the pairs, not the subsample
    d = oef[selected] - truth[selected]
    assert result["meanDifference"] == pytest.approx(d.mean(), rel=1e-12)
    assert result["loaUpper"] == pytest.approx(d.mean() + 1.96 * d.std(ddof=1), rel=1e-12)
    np.testing.assert_allclose(_column(result["linesTable"], "ba_loa_lower"), d.mean() - 1.96 * d.std(ddof=1))

    scatter, ba = result["scatterChart"], result["blandAltmanChart"]
    series = [env.GetNodeByID(scatter.GetNthPlotSeriesNodeID(i)) for i in range(scatter.GetNumberOfPlotSeriesNodes())]
    assert [(s.GetXColumnName(), s.GetYColumnName()) for s in series] == [("reference", "prediction"),
                                                                          ("identity", "identity")]
    assert series[0].GetTableNode() is points and series[0].GetLineStyle() == slicer.vtkMRMLPlotSeriesNode.LineStyleNone
    ba_series = [env.GetNodeByID(ba.GetNthPlotSeriesNodeID(i)) for i in range(ba.GetNumberOfPlotSeriesNodes())]
    assert [(s.GetXColumnName(), s.GetYColumnName()) for s in ba_series] == [
        ("mean", "difference"), ("ba_x", "ba_mean_diff"), ("ba_x", "ba_loa_lower"), ("ba_x", "ba_loa_upper")]

    # the difference map and the statistics table
    np.testing.assert_allclose(slicer.util.arrayFromVolume(result["difference"]),
                               np.nan_to_num(oef - truth, nan=0.0), atol=1e-5)
    assert result["statistics"].GetTable().GetNumberOfRows() == 8

    # the layout: registered once, selected; three linked axial views showing the three volumes
    layoutNode = logic.layoutNode()
    assert layoutNode.GetViewArrangement() == module.COMPARISON_LAYOUT_ID
    assert layoutNode.GetLayoutDescription(module.COMPARISON_LAYOUT_ID) == module.COMPARISON_LAYOUT_XML
    import xml.etree.ElementTree as ET

    root = ET.fromstring(module.COMPARISON_LAYOUT_XML)
    tags = [(v.get("class"), v.get("singletontag")) for v in root.iter("view")]
    assert tags[:3] == [("vtkMRMLSliceNode", name) for name, _l, _c in module.COMPARISON_SLICE_VIEWS]
    shown = []
    for name, _label, _color in module.COMPARISON_SLICE_VIEWS:
        sliceNode = logic.comparison._viewNode("vtkMRMLSliceNode", name)
        composite = slicer.vtkMRMLSliceLogic.GetSliceCompositeNode(sliceNode)
        assert composite.GetLinkedControl() and sliceNode.GetOrientation() == "Axial"
        assert sliceNode.GetViewGroup() == module.COMPARISON_VIEW_GROUP
        shown.append(composite.GetBackgroundVolumeID())
    assert shown == [nodes["OEF"].GetID(), refs["OEF"].GetID(), result["difference"].GetID()]
    red = slicer.vtkMRMLSliceLogic.GetSliceCompositeNode(logic.comparison._viewNode("vtkMRMLSliceNode", "Red"))
    assert not red.GetLinkedControl()  # the usual views are not linked to the comparison views
    plotViews = [logic.comparison._viewNode("vtkMRMLPlotViewNode", n) for n in module.COMPARISON_PLOT_VIEWS]
    assert [v.GetPlotChartNodeID() for v in plotViews] == [scatter.GetID(), ba.GetID()]
    tableView = logic.comparison._viewNode("vtkMRMLTableViewNode", module.COMPARISON_TABLE_VIEW)
    assert tableView.GetTableNodeID() == result["statistics"].GetID()

    # a rerun (another ROI source, more points) updates every node, adds none
    ids = scene_node_ids(env)
    box = env.AddNewNodeByClass("vtkMRMLMarkupsROINode", "box")
    box.SetCenter(0.0, 10.0, 3.0)
    box.SetSize(12.0, 12.0, 9.0)
    ids.append(box.GetID())
    again = logic.compareWithReference(nodes, box, refs["OEF"], showLayout=True, maxPoints=10_000)
    assert scene_node_ids(env) == ids
    for key in ("scatterChart", "blandAltmanChart", "table", "linesTable", "statistics", "difference"):
        assert again[key] is result[key], key
    assert again["nShown"] == again["nPairs"] == _column(points, "prediction").size
    assert "of" not in again["scatterChart"].GetTitle().split(",")[-1]
    assert result["statistics"].GetTable().GetNumberOfRows() == 2  # one box ROI x two maps
