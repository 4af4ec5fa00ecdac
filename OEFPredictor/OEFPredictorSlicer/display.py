"""How the maps are shown: colour tables, fixed windows, background thresholded away, the overlay
on echo 1 and its colour legend (with units)."""
from __future__ import annotations

import numpy as np

import slicer
from OEFPredictorLib import maptable

# Colour tables: Slicer's own (file-based, present in the application) first, else our own copy.
SLICER_COLOR_NODE_IDS = {
    "viridis": "vtkMRMLColorTableNodeFileViridis.txt",
    "inferno": "vtkMRMLColorTableNodeFileInferno.txt",
    "diverging": "vtkMRMLColorTableNodeFileDivergingBlueRed.txt",
    "grey": "vtkMRMLColorTableNodeGrey",
}
# 17 anchors each of matplotlib's viridis, inferno and RdBu_r (perceptually uniform / diverging).
_COLOR_ANCHORS = {
    "viridis": [(0.267, 0.005, 0.329), (0.282, 0.095, 0.417), (0.279, 0.175, 0.483), (0.259, 0.252, 0.525),
                (0.23, 0.322, 0.546), (0.199, 0.388, 0.555), (0.173, 0.449, 0.558), (0.149, 0.508, 0.557),
                (0.128, 0.567, 0.551), (0.121, 0.626, 0.533), (0.158, 0.684, 0.502), (0.246, 0.739, 0.452),
                (0.369, 0.789, 0.383), (0.516, 0.831, 0.294), (0.678, 0.864, 0.19), (0.846, 0.887, 0.1),
                (0.993, 0.906, 0.144)],
    "inferno": [(0.001, 0.0, 0.014), (0.042, 0.028, 0.141), (0.129, 0.047, 0.291), (0.238, 0.037, 0.396),
                (0.342, 0.062, 0.429), (0.441, 0.099, 0.432), (0.541, 0.135, 0.415), (0.64, 0.171, 0.381),
                (0.736, 0.216, 0.33), (0.822, 0.275, 0.266), (0.894, 0.353, 0.194), (0.947, 0.449, 0.115),
                (0.978, 0.558, 0.035), (0.988, 0.675, 0.065), (0.975, 0.798, 0.206), (0.948, 0.917, 0.411),
                (0.988, 0.998, 0.645)],
    "diverging": [(0.02, 0.188, 0.38), (0.089, 0.321, 0.565), (0.163, 0.445, 0.698), (0.247, 0.556, 0.754),
                  (0.421, 0.676, 0.819), (0.606, 0.79, 0.88), (0.761, 0.869, 0.925), (0.878, 0.926, 0.952),
                  (0.969, 0.966, 0.965), (0.984, 0.898, 0.847), (0.982, 0.801, 0.706), (0.96, 0.668, 0.536),
                  (0.895, 0.504, 0.4), (0.817, 0.332, 0.281), (0.728, 0.155, 0.197), (0.577, 0.055, 0.149),
                  (0.404, 0.0, 0.122)],
}
OWN_COLOR_NODE_NAMES = {"viridis": "OEFPredictor Viridis", "inferno": "OEFPredictor Inferno",
                        "diverging": "OEFPredictor Diverging"}


def interpolateAnchors(anchors, n=256):
    anchors = np.asarray(anchors, dtype=float)
    x = np.linspace(0.0, 1.0, len(anchors))
    t = np.linspace(0.0, 1.0, n)
    return np.stack([np.interp(t, x, anchors[:, c]) for c in range(3)], axis=1)


def unitsCode(text):
    """A UCUM coded entry for a unit ('' = no units), as volume nodes store it."""
    code = slicer.vtkCodedEntry()
    code.SetValueSchemeMeaning(text or "1", "UCUM", text or "no units")
    return code


def colorNodeID(kind):
    """Slicer's colour table of this kind when the application has it, else our own copy."""
    scene = slicer.mrmlScene
    nodeID = SLICER_COLOR_NODE_IDS.get(kind)
    if nodeID and scene.GetNodeByID(nodeID) is not None:
        return nodeID
    if kind == "grey":
        return "vtkMRMLColorTableNodeGrey"
    name = OWN_COLOR_NODE_NAMES[kind]
    existing = scene.GetFirstNode(name, "vtkMRMLColorTableNode")
    if existing is not None:
        return existing.GetID()
    colors = interpolateAnchors(_COLOR_ANCHORS[kind])
    node = slicer.vtkMRMLColorTableNode()
    node.SetName(name)
    node.SetTypeToUser()
    node.SetNumberOfColors(len(colors))
    node.GetLookupTable().SetTableRange(0, len(colors) - 1)
    for i, (r, g, b) in enumerate(colors):
        node.SetColor(i, r, g, b, 1.0)
    node.SetAttribute("Category", "OEFPredictor")
    node.SetHideFromEditors(False)
    scene.AddNode(node)
    return node.GetID()


def setMapDisplay(node, name, array, mask=None):
    """Colour table, fixed window, background thresholded away (maptable.MAPS; a map without its own
    row gets a grey table and the 1st-99th percentile window)."""
    spec = maptable.spec(name)
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    display = node.GetDisplayNode()
    inside = array[mask] if mask is not None and mask.shape == array.shape else array[array != 0]
    inside = inside[np.isfinite(inside)]
    lo, hi = spec.display_range or (
        (float(np.percentile(inside, 1)), float(np.percentile(inside, 99))) if inside.size else (0.0, 1.0))
    display.SetAndObserveColorNodeID(colorNodeID(spec.colors))
    display.SetAutoWindowLevel(False)
    display.SetWindowLevelMinMax(lo, hi)
    threshold = spec.threshold
    background = None
    if mask is not None and mask.shape == array.shape and (~mask).any():
        background = float(np.median(array[~mask]))
    if threshold is None and background is not None and inside.size and background < inside.min():
        threshold = background + 1e-6 * max(1.0, abs(background))
    display.SetAutoThreshold(False)
    if threshold is not None:
        display.SetThreshold(threshold, max(float(np.nanmax(array)) if array.size else hi, hi) + 1.0)
        display.SetApplyThreshold(True)
    else:
        display.SetApplyThreshold(False)
    display.SetInterpolate(False)


def colorLogic():
    """The Colors module's logic (the application's, or the one a test scene registers)."""
    modules = getattr(slicer, "modules", None)
    if modules is not None and hasattr(modules, "colors"):
        return modules.colors.logic()
    app = getattr(slicer, "app", None)
    return app.applicationLogic().GetModuleLogic("Colors") if app is not None else None


def showOverlay(oefNode, background, opacity):
    """OEF as the foreground over echo 1 in every slice view, with a colour legend (with units)."""
    if isinstance(background, dict):  # a sequence: show its first echo through the proxy node
        background["browser"].SetSelectedItemNumber(0)
        background = background["proxy"]
    kwargs = {"foreground": oefNode, "foregroundOpacity": float(opacity)}
    if background is not None:
        kwargs["background"] = background
    slicer.util.setSliceViewerLayers(**kwargs)
    logic = colorLogic()
    if logic is not None:
        legend = logic.AddDefaultColorLegendDisplayNode(oefNode)
        if legend is not None:
            spec = maptable.MAPS["OEF"]
            legend.SetTitleText(spec.label)
            legend.SetLabelFormat(spec.format)
            legend.SetVisibility(True)
    return oefNode
