"""Comparison of the maps with ROIs and a reference: exact ROI statistics in a table node, the
difference map, scatter and Bland-Altman charts, the comparison layout, and the CSV export (in the
command line's format). The numbers come from OEFPredictorLib.roistats; this file moves them in and
out of MRML."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import vtk

import slicer
from OEFPredictorLib import maptable
from OEFPredictorLib.errors import InputError

from . import display
from .compat import _

MAX_PLOT_POINTS = 5000  # the scatter / Bland-Altman plots draw at most this many voxels (a subsample)
COMPARISON_LAYOUT_ID = 56101  # a custom layout id, away from Slicer's own (SlicerLayout* < 1000)
COMPARISON_VIEW_GROUP = 56  # the three comparison views are linked with each other only
COMPARISON_SLICE_VIEWS = (("OEFPrediction", "P", "#F34A33"), ("OEFReference", "R", "#EDD54C"),
                          ("OEFDifference", "D", "#6EB04B"))
COMPARISON_PLOT_VIEWS = ("OEFScatter", "OEFBlandAltman")
COMPARISON_TABLE_VIEW = "OEFStatistics"
COMPARISON_ROLES = {key: "OEFPredictor." + key for key in (
    "statistics", "difference", "table", "linesTable", "scatterChart", "blandAltmanChart", "scatterPoints",
    "identity", "baPoints", "baMean", "baLower", "baUpper")}


def _comparisonLayoutXml():
    def sliceView(name, label, color):
        return (f'<item><view class="vtkMRMLSliceNode" singletontag="{name}">'
                f'<property name="orientation" action="default">Axial</property>'
                f'<property name="viewlabel" action="default">{label}</property>'
                f'<property name="viewcolor" action="default">{color}</property>'
                f'<property name="viewgroup" action="default">{COMPARISON_VIEW_GROUP}</property>'
                f'</view></item>')

    top = "".join(sliceView(*view) for view in COMPARISON_SLICE_VIEWS)
    bottom = "".join(f'<item><view class="vtkMRMLPlotViewNode" singletontag="{name}">'
                     f'<property name="viewlabel" action="default">{label}</property></view></item>'
                     for name, label in zip(COMPARISON_PLOT_VIEWS, ("S", "B")))
    bottom += (f'<item><view class="vtkMRMLTableViewNode" singletontag="{COMPARISON_TABLE_VIEW}">'
               f'<property name="viewlabel" action="default">T</property></view></item>')
    return ('<layout type="vertical" split="true">'
            f'<item splitSize="600"><layout type="horizontal" split="true">{top}</layout></item>'
            f'<item splitSize="400"><layout type="horizontal" split="true">{bottom}</layout></item>'
            '</layout>')


COMPARISON_LAYOUT_XML = _comparisonLayoutXml()


def matrixArray(volumeNode):
    m = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(m)
    return slicer.util.arrayFromVTKMatrix(m).copy()


def fillTable(tableNode, columns):
    """Replace a table node's columns with these float64 columns (name -> 1D array)."""
    with slicer.util.NodeModify(tableNode):
        tableNode.RemoveAllColumns()
        for name, values in columns.items():
            array = vtk.vtkDoubleArray()
            array.SetName(name)
            values = np.ascontiguousarray(values, dtype=np.float64)
            array.SetNumberOfValues(values.size)
            for i, value in enumerate(values):
                array.SetValue(i, float(value))
            tableNode.GetTable().AddColumn(array)
    return tableNode


class ComparisonLogic:
    """ROI statistics and the comparison with a reference, on MRML nodes (main thread)."""

    def __init__(self, predictionMasks=None):
        self._comparisonSliceLogics = []  # slice logics made outside the application (no views)
        # map node ID -> the voxels it was predicted in (PredictionLogic.predictionMasks): ROI
        # statistics leave the others (0 in the map, not 0 %) out and count them in n_unpredicted
        self.predictionMasks = {} if predictionMasks is None else predictionMasks

    def roisFromNode(self, roiNode, referenceVolume):
        """{name: boolean array on referenceVolume's grid} from a segmentation (each segment,
        resampled onto the volume), a labelmap on the same grid, or a markups ROI box."""
        from OEFPredictorLib import roistats

        shape = slicer.util.arrayFromVolume(referenceVolume).shape
        if roiNode.IsA("vtkMRMLSegmentationNode"):
            return self._segmentMasks(roiNode, referenceVolume)
        if roiNode.IsA("vtkMRMLLabelMapVolumeNode"):
            if (slicer.util.arrayFromVolume(roiNode).shape != shape
                    or not np.allclose(matrixArray(roiNode), matrixArray(referenceVolume), atol=1e-4)):
                raise InputError(_("The labelmap '{name}' is not on the maps' voxel grid; resample it or use a "
                                   "segmentation.").format(name=roiNode.GetName()))
            names = {}
            colorNode = roiNode.GetDisplayNode().GetColorNode() if roiNode.GetDisplayNode() else None
            if colorNode is not None and colorNode.GetSingletonTag():
                colorNode = None  # Slicer's built-in label tables name colours, not these regions
            labels = np.array(slicer.util.arrayFromVolume(roiNode))
            for value in np.unique(labels):
                if value and colorNode is not None and colorNode.GetColorName(int(value)):
                    names[int(value)] = colorNode.GetColorName(int(value))
            return roistats.rois_from_labels(labels, names)
        if roiNode.IsA("vtkMRMLMarkupsROINode"):
            center = [0.0, 0.0, 0.0]
            roiNode.GetCenterWorld(center)
            axes = slicer.util.arrayFromVTKMatrix(roiNode.GetObjectToWorldMatrix())[:3, :3]
            return {roiNode.GetName(): roistats.box_roi(shape, matrixArray(referenceVolume), center,
                                                        list(roiNode.GetSize()), axes=axes)}
        raise InputError(_("ROIs come from a segmentation, a labelmap or a markups ROI."))

    def _segmentMasks(self, segmentationNode, referenceVolume):
        """{segment name: boolean array on referenceVolume's grid}.

        A segment stored as a binary labelmap is resampled onto the volume (nearest neighbour: a
        voxel belongs to the segment when its centre lies in one of the segment's voxels), whatever
        its grid (spacing, origin, directions, transforms). A segment whose source is a closed
        surface (or another non-labelmap representation) is rasterized directly on the volume's
        grid, in a temporary copy of the segmentation: converting it through the segmentation's
        own reference geometry (often another, coarser series) and then resampling would move its
        border by up to a coarse voxel. The user's segmentation is not changed."""
        segmentation = segmentationNode.GetSegmentation()
        source = segmentationNode
        temporary = None
        labelmapName = slicer.vtkSegmentationConverter.GetSegmentationBinaryLabelmapRepresentationName()
        if segmentation.GetNumberOfSegments() and segmentation.GetSourceRepresentationName() != labelmapName:
            temporary = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "__OEFPredictor_temp__")
            temporary.SetHideFromEditors(True)
            temporary.GetSegmentation().DeepCopy(segmentation)
            temporary.GetSegmentation().RemoveRepresentation(labelmapName)
            temporary.SetAndObserveTransformNodeID(segmentationNode.GetTransformNodeID())
            # the volume's grid in the segmentation's coordinates (the export maps it back)
            temporary.SetReferenceImageGeometryParameterFromVolumeNode(referenceVolume)
            if not temporary.GetSegmentation().CreateRepresentation(labelmapName, True):
                slicer.mrmlScene.RemoveNode(temporary)
                raise InputError(_("The segmentation '{name}' cannot be converted to a labelmap.").format(
                    name=segmentationNode.GetName()))
            source = temporary
        scene = slicer.mrmlScene
        try:
            rois = {}
            for i in range(segmentation.GetNumberOfSegments()):
                segmentId = segmentation.GetNthSegmentID(i)
                # as slicer.util.arrayFromSegmentBinaryLabelmap, but leaving no node behind (it
                # leaves the temporary labelmap's display node in the scene)
                before = {scene.GetNthNode(n).GetID() for n in range(scene.GetNumberOfNodes())}
                labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__OEFPredictor_temp__")
                try:
                    ids = vtk.vtkStringArray()
                    ids.InsertNextValue(segmentId)
                    logic = slicer.modules.segmentations.logic()
                    if not logic.ExportSegmentsToLabelmapNode(source, ids, labelmap, referenceVolume):
                        raise InputError(_("The segment '{name}' cannot be resampled onto the maps' grid.").format(
                            name=segmentation.GetSegment(segmentId).GetName()))
                    array = np.array(slicer.util.arrayFromVolume(labelmap)) > 0
                finally:
                    added = [scene.GetNthNode(n) for n in range(scene.GetNumberOfNodes())]
                    for node in added:
                        if node.GetID() not in before:
                            scene.RemoveNode(node)
                rois[segmentation.GetSegment(segmentId).GetName()] = array
            return rois
        finally:
            if temporary is not None:
                if temporary.GetDisplayNode() is not None:
                    scene.RemoveNode(temporary.GetDisplayNode())
                scene.RemoveNode(temporary)

    def computeRoiStatistics(self, mapNodes, roiNode, referenceNodes=None, maskNode=None, tableNode=None):
        """Exact ROI statistics (OEFPredictorLib.roistats) of the maps into a table node (one row per
        ROI and map; columns as roistats.COLUMNS). A given tableNode is updated, not duplicated."""
        from OEFPredictorLib import roistats

        names = [n for n in maptable.MAPS if n in mapNodes] + [n for n in mapNodes if n not in maptable.MAPS]
        first = mapNodes[names[0]]
        maps = {n: np.array(slicer.util.arrayFromVolume(mapNodes[n]), dtype=np.float64) for n in names}
        reference = {n: np.array(slicer.util.arrayFromVolume(node), dtype=np.float64)
                     for n, node in (referenceNodes or {}).items() if node is not None}
        for label, node in [(n, mapNodes[n]) for n in names] + list((referenceNodes or {}).items()) + [("mask", maskNode)]:
            if node is not None and not np.allclose(matrixArray(node), matrixArray(first), atol=1e-4):
                raise InputError(_("The {label} volume is not on the maps' voxel grid.").format(label=label))
        mask = None if maskNode is None else np.array(slicer.util.arrayFromVolume(maskNode)) > 0
        rois = self.roisFromNode(roiNode, first)
        spacing = first.GetSpacing()
        predicted = {n: self.predictionMasks.get(mapNodes[n].GetID()) for n in names}
        predicted = {n: m for n, m in predicted.items() if m is not None and m.shape == maps[n].shape}
        rows = roistats.roi_statistics(maps, rois, roistats.voxel_volume_ml(spacing), mask=mask,
                                       reference=reference or None, contrasts=roistats.contralateral_pairs(rois),
                                       units={n: maptable.unit(n) for n in names}, predicted=predicted)
        if tableNode is None:
            tableNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLTableNode",
                                                           slicer.mrmlScene.GenerateUniqueName("OEF ROI statistics"))
        table = tableNode.GetTable()
        with slicer.util.NodeModify(tableNode):
            tableNode.RemoveAllColumns()
            for column in roistats.COLUMNS:
                if column in roistats.TEXT_COLUMNS:
                    array = vtk.vtkStringArray()
                elif column in roistats.INT_COLUMNS:
                    array = vtk.vtkIntArray()
                else:
                    array = vtk.vtkDoubleArray()
                array.SetName(column)
                for row in rows:
                    value = row[column]
                    if column in roistats.TEXT_COLUMNS:
                        array.InsertNextValue("" if value is None else str(value))
                    elif column in roistats.INT_COLUMNS:
                        array.InsertNextValue(int(value))
                    else:
                        array.InsertNextValue(float("nan") if value is None else float(value))
                table.AddColumn(array)
        return tableNode

    def differenceMap(self, mapNode, referenceNode, outputNode=None):
        """Prediction minus reference in a volume node, with a diverging colour table centred on 0."""
        from OEFPredictorLib import roistats

        if not np.allclose(matrixArray(mapNode), matrixArray(referenceNode), atol=1e-4):
            raise InputError(_("The reference volume is not on the map's voxel grid."))
        diff = roistats.difference_map(slicer.util.arrayFromVolume(mapNode), slicer.util.arrayFromVolume(referenceNode))
        diff = np.nan_to_num(diff, nan=0.0)
        if outputNode is None:
            outputNode = slicer.mrmlScene.AddNewNodeByClass(
                "vtkMRMLScalarVolumeNode", slicer.mrmlScene.GenerateUniqueName(mapNode.GetName() + " minus reference"))
        outputNode.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(matrixArray(mapNode)))
        slicer.util.updateVolumeFromArray(outputNode, diff)
        if outputNode.GetDisplayNode() is None:
            outputNode.CreateDefaultDisplayNodes()
        displayNode = outputNode.GetDisplayNode()
        limit = float(np.percentile(np.abs(diff[diff != 0]), 99)) if np.any(diff) else 1.0
        displayNode.SetAndObserveColorNodeID(display.colorNodeID("diverging"))
        displayNode.SetAutoWindowLevel(False)
        displayNode.SetWindowLevelMinMax(-limit, limit)
        return outputNode

    # --- comparison with a reference: CSV, plots, layout ------------------------------------------
    def tableRows(self, tableNode):
        """The rows of a statistics table node as roistats rows (dicts keyed by roistats.COLUMNS)."""
        from OEFPredictorLib import roistats

        table = tableNode.GetTable()
        columns = [table.GetColumnName(c) for c in range(table.GetNumberOfColumns())]
        rows = []
        for r in range(table.GetNumberOfRows()):
            row = {}
            for c, name in enumerate(columns):
                value = table.GetValue(r, c)
                if name in roistats.TEXT_COLUMNS:
                    row[name] = value.ToString()
                elif name in roistats.INT_COLUMNS:
                    row[name] = int(value.ToInt())
                else:
                    row[name] = float(value.ToDouble())
            rows.append(row)
        return rows

    def exportTableToCsv(self, tableNode, path):
        """Write a statistics table node to CSV, in the command line's format (roistats.write_csv:
        same columns, floats at full precision, NaN as an empty cell). Atomic: written beside the
        file and renamed, so an error leaves no partial file. Returns the path."""
        from OEFPredictorLib import roistats

        if tableNode is None or tableNode.GetTable() is None or tableNode.GetTable().GetNumberOfColumns() == 0:
            raise InputError(_("There is no statistics table to export; compute the statistics first."))
        path = Path(path)
        if path.is_dir():
            raise InputError(_("{path} is a folder; give a file name.").format(path=path))
        table = tableNode.GetTable()
        columns = [table.GetColumnName(c) for c in range(table.GetNumberOfColumns())]
        return roistats.write_csv(self.tableRows(tableNode), path, columns=columns)

    @staticmethod
    def _ownedNode(owner, role, className, name):
        """The node `owner` references under `role` (reruns update it), else a new one."""
        node = owner.GetNodeReference(role) if owner is not None else None
        if node is None or not node.IsA(className) or node.GetScene() is not slicer.mrmlScene:
            node = slicer.mrmlScene.AddNewNodeByClass(className, slicer.mrmlScene.GenerateUniqueName(name))
            if owner is not None:
                owner.SetNodeReferenceID(role, node.GetID())
        return node

    def comparisonPlots(self, mapNode, referenceNode, roiNode, maskNode=None, maxPoints=None, seed=0):
        """Scatter (prediction against reference) and Bland-Altman (difference against mean) plot
        chart nodes of the voxels inside the ROIs (their union) and the mask where both values are
        finite.

        For display, at most maxPoints voxels (default MAX_PLOT_POINTS) are drawn, a uniform random
        subsample with a fixed seed; the chart titles say how many of how many. The Bland-Altman
        lines (mean difference, limits of agreement mean -+ 1.96 SD) and the identity line use all
        the voxels. The nodes are referenced from mapNode (roles COMPARISON_ROLES): reruns update
        them, never duplicate them. Returns {"scatterChart", "blandAltmanChart", "table",
        "linesTable", "nPairs", "nShown", "meanDifference", "loaLower", "loaUpper"}."""
        from OEFPredictorLib import roistats

        maxPoints = MAX_PLOT_POINTS if maxPoints is None else int(maxPoints)
        if not np.allclose(matrixArray(mapNode), matrixArray(referenceNode), atol=1e-4):
            raise InputError(_("The reference volume is not on the map's voxel grid."))
        values = np.array(slicer.util.arrayFromVolume(mapNode), dtype=np.float64)
        reference = np.array(slicer.util.arrayFromVolume(referenceNode), dtype=np.float64)
        if values.shape != reference.shape:
            raise InputError(_("The reference volume is not on the map's voxel grid."))
        rois = self.roisFromNode(roiNode, mapNode)
        union = np.zeros(values.shape, bool)
        for roi in rois.values():
            union |= roi
        mask = None if maskNode is None else np.array(slicer.util.arrayFromVolume(maskNode)) > 0
        pred, ref = roistats.paired_values(values, reference, union, mask)
        nPairs = int(pred.size)
        if nPairs > maxPoints:
            keep = np.sort(np.random.default_rng(seed).choice(nPairs, size=maxPoints, replace=False))
            shownPred, shownRef = pred[keep], ref[keep]
        else:
            shownPred, shownRef = pred, ref
        nShown = int(shownPred.size)
        stats = roistats.paired_statistics(pred, ref)

        name = mapNode.GetAttribute("OEFPredictor.Map") or mapNode.GetName()
        unit = maptable.unit(name) or mapNode.GetAttribute("OEFPredictor.Unit") or ""
        unitText = f" ({unit})" if unit else ""
        roles = COMPARISON_ROLES
        pointsTable = self._ownedNode(mapNode, roles["table"], "vtkMRMLTableNode", f"{name} comparison points")
        linesTable = self._ownedNode(mapNode, roles["linesTable"], "vtkMRMLTableNode", f"{name} comparison lines")
        mean = (shownPred + shownRef) / 2.0
        diff = shownPred - shownRef
        fillTable(pointsTable, {"reference": shownRef, "prediction": shownPred, "mean": mean, "difference": diff})
        if nPairs:
            lo = float(min(pred.min(), ref.min()))
            hi = float(max(pred.max(), ref.max()))
            meanAll = (pred + ref) / 2.0
            mlo, mhi = float(meanAll.min()), float(meanAll.max())
        else:
            lo = hi = mlo = mhi = float("nan")
        md, lower, upper = stats["ba_mean_diff"], stats["ba_loa_lower"], stats["ba_loa_upper"]
        fillTable(linesTable, {"identity": np.array([lo, hi]), "ba_x": np.array([mlo, mhi]),
                                "ba_mean_diff": np.array([md, md]), "ba_loa_lower": np.array([lower, lower]),
                                "ba_loa_upper": np.array([upper, upper])})

        def series(role, title, table, xColumn, yColumn, scatter, color, style=None):
            node = self._ownedNode(mapNode, roles[role], "vtkMRMLPlotSeriesNode", title)
            node.SetName(title)
            node.SetAndObserveTableNodeID(table.GetID())
            node.SetXColumnName(xColumn)
            node.SetYColumnName(yColumn)
            node.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
            if scatter:
                node.SetMarkerStyle(slicer.vtkMRMLPlotSeriesNode.MarkerStyleCircle)
                node.SetMarkerSize(4)
                node.SetLineStyle(slicer.vtkMRMLPlotSeriesNode.LineStyleNone)
            else:
                node.SetMarkerStyle(slicer.vtkMRMLPlotSeriesNode.MarkerStyleNone)
                node.SetLineStyle(style if style is not None else slicer.vtkMRMLPlotSeriesNode.LineStyleSolid)
                node.SetLineWidth(2)
            node.SetColor(*color)
            return node

        dash = slicer.vtkMRMLPlotSeriesNode.LineStyleDash
        sample = (_("{n:,} of {total:,} voxels shown (random subsample)").format(n=nShown, total=nPairs)
                  if nShown < nPairs else _("{n:,} voxels").format(n=nPairs))
        scatterSeries = [
            series("scatterPoints", _("Voxels"), pointsTable, "reference", "prediction", True, (0.2, 0.4, 0.8)),
            series("identity", _("Identity"), linesTable, "identity", "identity", False, (0.3, 0.3, 0.3), dash)]
        baSeries = [
            series("baPoints", _("Voxels (Bland-Altman)"), pointsTable, "mean", "difference", True, (0.2, 0.4, 0.8)),
            series("baMean", _("Mean difference"), linesTable, "ba_x", "ba_mean_diff", False, (0.8, 0.2, 0.2)),
            series("baLower", _("Lower limit of agreement"), linesTable, "ba_x", "ba_loa_lower", False,
                   (0.5, 0.5, 0.5), dash),
            series("baUpper", _("Upper limit of agreement"), linesTable, "ba_x", "ba_loa_upper", False,
                   (0.5, 0.5, 0.5), dash)]
        charts = {}
        for key, title, xTitle, yTitle, seriesNodes in (
                ("scatterChart", _("{name}: prediction against reference, {sample}").format(name=name, sample=sample),
                 _("Reference {name}").format(name=name) + unitText, _("Predicted {name}").format(name=name) + unitText,
                 scatterSeries),
                ("blandAltmanChart", _("{name}: Bland-Altman, bias {b:.3g}, limits {lo:.3g} to {hi:.3g}; {sample}").format(
                    name=name, b=md, lo=lower, hi=upper, sample=sample),
                 _("Mean of prediction and reference") + unitText, _("Prediction minus reference") + unitText,
                 baSeries)):
            chart = self._ownedNode(mapNode, roles[key], "vtkMRMLPlotChartNode", f"{name} {key}")
            with slicer.util.NodeModify(chart):
                chart.SetTitle(title)
                chart.SetXAxisTitle(xTitle)
                chart.SetYAxisTitle(yTitle)
                chart.SetLegendVisibility(True)
                chart.RemoveAllPlotSeriesNodeIDs()
                for node in seriesNodes:
                    chart.AddAndObservePlotSeriesNodeID(node.GetID())
            charts[key] = chart
        return {**charts, "table": pointsTable, "linesTable": linesTable, "nPairs": nPairs, "nShown": nShown,
                "meanDifference": md, "loaLower": lower, "loaUpper": upper}

    def layoutNode(self):
        """The scene's layout node (the application's; created outside it, e.g. in tests)."""
        app = getattr(slicer, "app", None)
        if app is not None and hasattr(app, "layoutManager") and app.layoutManager() is not None:
            return app.layoutManager().layoutLogic().GetLayoutNode()
        scene = slicer.mrmlScene
        node = scene.GetSingletonNode("vtkMRMLLayoutNode", "vtkMRMLLayoutNode")
        if node is None:
            node = scene.GetFirstNodeByClass("vtkMRMLLayoutNode")
        if node is None:
            node = slicer.vtkMRMLLayoutNode()
            node.SetSingletonTag("vtkMRMLLayoutNode")
            scene.AddNode(node)
        return node

    def _viewNode(self, className, layoutName):
        scene = slicer.mrmlScene
        for i in range(scene.GetNumberOfNodesByClass(className)):
            node = scene.GetNthNodeByClass(i, className)
            if node.GetLayoutName() == layoutName:
                return node
        return None

    def comparisonSliceNodes(self):
        """{layout name: (slice node, slice composite node)} of the comparison layout's three views.

        In Slicer the layout manager creates them when the layout is shown; elsewhere (a script
        without views, the tests) they are created here as the application would."""
        nodes = {}
        for layoutName, _label, _color in COMPARISON_SLICE_VIEWS:
            sliceNode = self._viewNode("vtkMRMLSliceNode", layoutName)
            if sliceNode is None:
                sliceLogic = slicer.vtkMRMLSliceLogic()
                sliceLogic.SetMRMLScene(slicer.mrmlScene)
                sliceNode = sliceLogic.AddSliceNode(layoutName)
                self._comparisonSliceLogics.append(sliceLogic)
            composite = slicer.vtkMRMLSliceLogic.GetSliceCompositeNode(sliceNode)
            if composite is None:
                composite = slicer.vtkMRMLSliceCompositeNode()
                composite.SetLayoutName(layoutName)
                slicer.mrmlScene.AddNode(composite)
            nodes[layoutName] = (sliceNode, composite)
        return nodes

    def showComparisonLayout(self, mapNode, referenceNode, differenceNode, scatterChart=None, blandAltmanChart=None,
                             tableNode=None):
        """Switch to the comparison layout: prediction, reference and difference side by side in
        three axial slice views linked together (own view group, so the usual views are not
        moved), and below them the scatter and Bland-Altman charts and the statistics table.
        The layout is registered with the layout node once (COMPARISON_LAYOUT_ID)."""
        layoutNode = self.layoutNode()
        if not layoutNode.IsLayoutDescription(COMPARISON_LAYOUT_ID):
            layoutNode.AddLayoutDescription(COMPARISON_LAYOUT_ID, COMPARISON_LAYOUT_XML)
        else:
            layoutNode.SetLayoutDescription(COMPARISON_LAYOUT_ID, COMPARISON_LAYOUT_XML)
        layoutNode.SetViewArrangement(COMPARISON_LAYOUT_ID)
        volumes = (mapNode, referenceNode, differenceNode)
        views = self.comparisonSliceNodes()
        for (layoutName, _label, _color), volume in zip(COMPARISON_SLICE_VIEWS, volumes):
            sliceNode, composite = views[layoutName]
            sliceNode.SetViewGroup(COMPARISON_VIEW_GROUP)
            if sliceNode.GetOrientation() != "Axial":
                sliceNode.SetOrientationToAxial()
            with slicer.util.NodeModify(composite):
                composite.SetBackgroundVolumeID(volume.GetID() if volume is not None else None)
                composite.SetForegroundVolumeID(None)
                composite.SetLabelVolumeID(None)
                composite.SetLinkedControl(True)
                composite.SetHotLinkedControl(False)
        for layoutName, className, node, setter in (
                (COMPARISON_PLOT_VIEWS[0], "vtkMRMLPlotViewNode", scatterChart, "SetPlotChartNodeID"),
                (COMPARISON_PLOT_VIEWS[1], "vtkMRMLPlotViewNode", blandAltmanChart, "SetPlotChartNodeID"),
                (COMPARISON_TABLE_VIEW, "vtkMRMLTableViewNode", tableNode, "SetTableNodeID")):
            if node is None:
                continue
            viewNode = self._viewNode(className, layoutName)
            if viewNode is None:
                viewNode = slicer.mrmlScene.AddNewNodeByClass(className)
                viewNode.SetLayoutName(layoutName)
                viewNode.SetName(layoutName)
            getattr(viewNode, setter)(node.GetID())
        app = getattr(slicer, "app", None)
        if app is not None and hasattr(app, "layoutManager") and app.layoutManager() is not None:
            for layoutName, _label, _color in COMPARISON_SLICE_VIEWS:  # centre each view on its volume
                sliceWidget = app.layoutManager().sliceWidget(layoutName)
                if sliceWidget is not None:
                    sliceWidget.sliceLogic().FitSliceToAll()
        return views

    def compareWithReference(self, mapNodes, roiNode, referenceNode, maskNode=None, tableNode=None,
                             mapName="OEF", showLayout=False, maxPoints=None):
        """All of the comparison in one call: the statistics table (see computeRoiStatistics), the
        difference map, and the scatter and Bland-Altman charts of mapNodes[mapName] against
        referenceNode inside the ROIs; optionally the comparison layout. Reruns update the same
        nodes (referenced from the map node). Returns a dict of the nodes and numbers."""
        mapNode = mapNodes[mapName]
        if tableNode is None:
            tableNode = mapNode.GetNodeReference(COMPARISON_ROLES["statistics"])
        tableNode = self.computeRoiStatistics(mapNodes, roiNode, referenceNodes={mapName: referenceNode},
                                              maskNode=maskNode, tableNode=tableNode)
        mapNode.SetNodeReferenceID(COMPARISON_ROLES["statistics"], tableNode.GetID())
        difference = self.differenceMap(mapNode, referenceNode,
                                        outputNode=mapNode.GetNodeReference(COMPARISON_ROLES["difference"]))
        mapNode.SetNodeReferenceID(COMPARISON_ROLES["difference"], difference.GetID())
        result = self.comparisonPlots(mapNode, referenceNode, roiNode, maskNode=maskNode, maxPoints=maxPoints)
        result.update({"statistics": tableNode, "difference": difference})
        if showLayout:
            self.showComparisonLayout(mapNode, referenceNode, difference, result["scatterChart"],
                                      result["blandAltmanChart"], tableNode)
        return result
