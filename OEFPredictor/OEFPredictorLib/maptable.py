"""Every map the engine makes, in one table: its name, output file, BIDS desc label, unit, title,
display range and colour table.

The command line's outputs (files.write_maps), the BIDS derivatives (cohort), the ROI statistics
(roistats), the figures, the Slicer display and the Slicer panel's output selectors all read MAPS;
adding a map or renaming a unit is one row here. Each unit is spelled once: in its row, or as a
constant below where several maps share it.
"""
from __future__ import annotations

import dataclasses

PERCENT, PERCENTAGE_POINTS, FRACTION = "%", "pp", ""  # units several maps (and evaluate's errors) share
OEF_RANGE = (0.0, 80.0)  # percent: the display range of OEF and its interval ends, everywhere


@dataclasses.dataclass(frozen=True)
class MapSpec:
    name: str  # the engine's key (PredictionResult.maps)
    file: str | None  # the output file of `oefpredictor predict` (None: not written)
    desc: str  # the BIDS desc- label of the derivative (letters and digits)
    unit: str  # '' for fractions and unitless maps
    title: str  # as displays and legends show it
    description: str  # one line for sidecars and provenance
    display_range: tuple[float, float] | None  # None: the 1st-99th percentile inside the mask
    colors: str  # colour table kind: viridis, inferno, diverging, grey
    format: str = "%.3g"  # legend label format
    threshold: float | None = None  # hide voxels at or below (None: hide the background if outside)
    group: str = "base"  # base: always made; interval: methods with an interval; cbf: with a CBF map
    panel: bool = True  # the Slicer panel offers an output selector for it (panel_field)

    @property
    def label(self) -> str:
        """'OEF (%)': the title with its unit, for axes and legends."""
        return f"{self.title} ({self.unit})" if self.unit else self.title

    @property
    def panel_field(self) -> str:
        """The Slicer parameter-node field of this map's output volume (outputOEF, outputChinb...)."""
        return "output" + self.desc[0].upper() + self.desc[1:]


MAPS = {m.name: m for m in (
    MapSpec("OEF", "oef.nii.gz", "OEF", PERCENT, "OEF", "oxygen extraction fraction, 100 (1 - Y / Ya)",
            OEF_RANGE, "viridis", "%.0f", 1e-3),
    MapSpec("S0", "S0.nii.gz", "S0", "a.u.", "S0", "signal at TE 0, in the units of the input magnitudes",
            None, "grey"),
    MapSpec("R2", "R2.nii.gz", "R2", "Hz", "R2", "transverse relaxation rate", (0.0, 30.0), "inferno", "%.0f"),
    MapSpec("Y", "Y.nii.gz", "Y", FRACTION, "Y (venous O2 saturation)", "venous oxygen saturation (fraction)",
            (0.2, 1.0), "viridis", "%.2f"),
    MapSpec("v", "v.nii.gz", "v", FRACTION, "v (venous blood volume)", "venous blood volume fraction",
            (0.0, 0.1), "viridis", "%.2f"),
    MapSpec("chi_nb", "chi_nb.nii.gz", "chinb", "ppm", "chi_nb", "non-blood tissue susceptibility",
            (-0.1, 0.1), "diverging", "%.2f"),
    # lower is better: about the noise level where the model explains the data (predict's module doc)
    MapSpec("quality", "quality.nii.gz", "quality", "", "Quality (model residual)",
            "normalised RMS residual of the QQ forward model", None, "inferno", "%.3f"),
    MapSpec("CMRO2", "cmro2.nii.gz", "CMRO2", "umol/100 g/min", "CMRO2", "cerebral metabolic rate of oxygen, CBF OEF [H]a",
            (0.0, 250.0), "inferno", "%.0f", 1e-3, group="cbf", panel=False),
    # the uncertainty interval of methods that have one: its ends on the OEF scale, its width apart
    MapSpec("OEF_p05", "oef_p05.nii.gz", "OEFp05", PERCENT, "OEF 5th percentile",
            "lower end of the 90 % OEF interval", OEF_RANGE, "viridis", "%.0f", 1e-3, group="interval"),
    MapSpec("OEF_p95", "oef_p95.nii.gz", "OEFp95", PERCENT, "OEF 95th percentile",
            "upper end of the 90 % OEF interval", OEF_RANGE, "viridis", "%.0f", 1e-3, group="interval"),
    MapSpec("OEF_width", None, "OEFwidth", PERCENTAGE_POINTS, "OEF interval width",  # = p95 - p05: not written
            "width of the 90 % OEF interval", (0.0, 40.0), "inferno", "%.0f", group="interval"),
)}

BASE = tuple(n for n, m in MAPS.items() if m.group == "base")  # every prediction has these
INTERVAL = tuple(n for n, m in MAPS.items() if m.group == "interval")  # methods.Method.interval
MASK_FILE = "mask.nii.gz"  # the voxels predicted, written beside the maps
PROVENANCE_FILE = "prediction.json"


def spec(name: str) -> MapSpec:
    """The row of a map; a map the table lacks gets a plain grey one (its name as title, no unit)."""
    return MAPS.get(name) or MapSpec(name, f"{name}.nii.gz", "".join(c for c in name if c.isalnum()), "", name,
                                     f"{name} map", None, "grey")


def unit(name: str) -> str:
    return spec(name).unit


def name_of_file(filename: str) -> str | None:
    """The map an output file (oef.nii.gz, chi_nb.nii.gz) or desc label (chinb, OEFp05) names; None if none."""
    key = filename.lower()
    for m in MAPS.values():
        if key in {m.name.lower(), m.desc.lower(), (m.file or "").lower().split(".")[0]}:
            return m.name
    return None
