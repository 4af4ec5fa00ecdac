"""ROI statistics and comparison with a reference (ground-truth) map, on numpy arrays.

Arrays in, rows out: the command line (`oefpredictor stats`) and the Slicer module's Logic both
call `roi_statistics`, so their numbers are the same by construction. Arrays are 3D, (z, y, x) as
SimpleITK and slicer.util.arrayFromVolume give them.

    rois = rois_from_labels(labels, names)          # or {name: bool array}, box_roi(...)
    rows = roi_statistics({"OEF": oef, "R2": r2}, rois, voxel_volume_ml(spacing), mask=brain,
                          reference={"OEF": truth}, contrasts=contralateral_pairs(rois))
    write_csv(rows, "stats.csv"); print(format_table(rows))   # rows: dicts with keys COLUMNS

Also: difference_map (prediction - reference), paired_values (the points of a scatter /
Bland-Altman plot), contrast_to_noise, describe, paired_statistics, read_label_names (dseg.tsv),
map_name_from_path.

Definitions (every one is an exact numpy computation in float64 on the voxels used, no histogram):

- ROI voxels: the ROI restricted to the mask (when a mask is given). `n_outside_mask` counts the ROI
  voxels the mask dropped. `n_voxels` / `volume_ml` describe the ROI inside the mask.
- Unpredicted voxels: the prediction writes 0 where it predicted nothing (outside its mask, NaN
  inputs), and 0 % is a valid OEF; so with `predicted` (the prediction's own mask, mask.nii.gz of
  `oefpredictor predict`) the voxels outside it are excluded and counted in `n_unpredicted`.
- Values: the map's values on the remaining voxels; non-finite values (NaN, +-inf) are excluded and
  counted in `n_nonfinite`; `n_valid` values remain for the statistics
  (n_voxels = n_unpredicted + n_nonfinite + n_valid).
- `sd`: the sample standard deviation, ddof=1 (divide by n - 1). An ROI's voxels are a sample of the
  tissue, and n - 1 is what R's sd(), SPSS, scipy.stats.describe and the Bland-Altman limits use.
  With one value it is NaN (undefined), not 0.
- `p05`, `p95`: numpy's default ("linear", Hyndman-Fan type 7) percentiles.
- With a reference map: pairs where both values are finite (`n_paired`); d = map - reference;
  `bias` = mean(d), `mae` = mean(|d|), `rmse` = sqrt(mean(d^2)), `pearson_r` (NaN with fewer than
  two pairs or a constant side); Bland-Altman: `ba_mean_diff` = mean(d) (equal to bias),
  `ba_sd_diff` = SD(d, ddof=1), limits of agreement `ba_loa_lower/upper` = mean(d) -+ 1.96 SD(d).
- Contrast between a lesion ROI and a reference region (e.g. its contralateral mirror), per map:
  `contrast` = mean_lesion - mean_ref and
  `cnr` = (mean_lesion - mean_ref) / sqrt((sd_lesion^2 + sd_ref^2) / 2)   (sds with ddof=1),
  the difference of means in units of the pooled (root-mean-square) SD of the two regions; NaN when
  either region has fewer than two values or both SDs are 0. `reference_cnr` is the same on the
  reference map, to see whether a prediction keeps the lesion's contrast.
- Empty ROIs give counts of 0 and NaN statistics.
"""
from __future__ import annotations

import csv
import math
import os
import re
import uuid
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from .errors import InputError
from . import maptable

# Column order of the rows (and of the CSV / Slicer table).
COLUMNS = (
    "roi", "map", "unit",
    "n_voxels", "volume_ml", "n_outside_mask", "n_unpredicted", "n_nonfinite", "n_valid",
    "mean", "sd", "median", "min", "max", "p05", "p95", "interval_width",
    "n_paired", "rmse", "mae", "bias", "pearson_r",
    "ba_mean_diff", "ba_sd_diff", "ba_loa_lower", "ba_loa_upper",
    "contrast_reference", "contrast", "cnr", "reference_cnr",
)
# Columns that hold counts (integers) and text; all others are floats (NaN when undefined).
INT_COLUMNS = ("n_voxels", "n_outside_mask", "n_unpredicted", "n_nonfinite", "n_valid", "n_paired")
TEXT_COLUMNS = ("roi", "map", "unit", "contrast_reference")

LOA_FACTOR = 1.96  # Bland-Altman: 95 % limits of agreement for normally distributed differences
CONTRALATERAL_PREFIX = "contralateral_"

_NAN = float("nan")


# --- building blocks ------------------------------------------------------------------------

def voxel_volume_ml(spacing_mm: Sequence[float]) -> float:
    """Volume of one voxel in mL from its spacing in mm (1 mL = 1000 mm^3)."""
    return float(np.prod([float(s) for s in spacing_mm])) / 1000.0


def describe(values: np.ndarray) -> dict:
    """Descriptive statistics of a 1D array of finite values (see the module notes)."""
    v = np.asarray(values, dtype=np.float64).ravel()
    n = v.size
    if n == 0:
        return {"mean": _NAN, "sd": _NAN, "median": _NAN, "min": _NAN, "max": _NAN,
                "p05": _NAN, "p95": _NAN}
    p05, p95 = np.percentile(v, [5.0, 95.0])
    return {
        "mean": float(v.mean()),
        "sd": float(v.std(ddof=1)) if n > 1 else _NAN,
        "median": float(np.median(v)),
        "min": float(v.min()),
        "max": float(v.max()),
        "p05": float(p05),
        "p95": float(p95),
    }


def paired_statistics(values: np.ndarray, reference: np.ndarray) -> dict:
    """Agreement of paired finite values with their reference (see the module notes)."""
    x = np.asarray(values, dtype=np.float64).ravel()
    y = np.asarray(reference, dtype=np.float64).ravel()
    n = x.size
    out = {"n_paired": int(n), "rmse": _NAN, "mae": _NAN, "bias": _NAN, "pearson_r": _NAN,
           "ba_mean_diff": _NAN, "ba_sd_diff": _NAN, "ba_loa_lower": _NAN, "ba_loa_upper": _NAN}
    if n == 0:
        return out
    d = x - y
    bias = float(d.mean())
    out.update(rmse=float(np.sqrt(np.mean(d * d))), mae=float(np.mean(np.abs(d))), bias=bias,
               ba_mean_diff=bias)
    if n > 1:
        sd_d = float(d.std(ddof=1))
        out.update(ba_sd_diff=sd_d, ba_loa_lower=bias - LOA_FACTOR * sd_d,
                   ba_loa_upper=bias + LOA_FACTOR * sd_d)
        xc, yc = x - x.mean(), y - y.mean()
        denom = math.sqrt(float(np.dot(xc, xc)) * float(np.dot(yc, yc)))
        if denom > 0:
            out["pearson_r"] = float(np.clip(np.dot(xc, yc) / denom, -1.0, 1.0))
    return out


def cnr_from_values(lesion_values: np.ndarray, reference_values: np.ndarray) -> float:
    """(mean_l - mean_r) / sqrt((sd_l^2 + sd_r^2) / 2), sds with ddof=1; NaN when undefined."""
    a = np.asarray(lesion_values, dtype=np.float64).ravel()
    b = np.asarray(reference_values, dtype=np.float64).ravel()
    if a.size < 2 or b.size < 2:
        return _NAN
    noise = math.sqrt((a.var(ddof=1) + b.var(ddof=1)) / 2.0)
    if noise == 0:
        return _NAN
    return float((a.mean() - b.mean()) / noise)


def contrast_to_noise(values: np.ndarray, lesion_roi: np.ndarray, reference_roi: np.ndarray,
                      mask: np.ndarray | None = None) -> float:
    """Contrast-to-noise ratio of a map between a lesion ROI and a reference region (both boolean
    arrays of the map's shape, restricted to the mask when given; non-finite values excluded)."""
    _check_shapes({"values": values, "lesion_roi": lesion_roi, "reference_roi": reference_roi,
                   **({} if mask is None else {"mask": mask})})
    values = np.asarray(values)
    finite = np.isfinite(values)
    keep = finite if mask is None else finite & np.asarray(mask, dtype=bool)
    return cnr_from_values(values[np.asarray(lesion_roi, dtype=bool) & keep],
                           values[np.asarray(reference_roi, dtype=bool) & keep])


def difference_map(values: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Prediction minus reference (float32), NaN where either is not finite."""
    _check_shapes({"values": values, "reference": reference})
    d = np.asarray(values, dtype=np.float64) - np.asarray(reference, dtype=np.float64)
    d[~np.isfinite(d)] = np.nan
    return d.astype(np.float32)


def paired_values(values: np.ndarray, reference: np.ndarray, roi: np.ndarray,
                  mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The (map, reference) value pairs inside an ROI (and the mask) where both are finite: what
    the scatter and Bland-Altman plots show."""
    _check_shapes({"values": values, "reference": reference, "roi": roi,
                   **({} if mask is None else {"mask": mask})})
    values, reference = np.asarray(values), np.asarray(reference)
    sel = np.asarray(roi, dtype=bool) & np.isfinite(values) & np.isfinite(reference)
    if mask is not None:
        sel &= np.asarray(mask, dtype=bool)
    return values[sel].astype(np.float64), reference[sel].astype(np.float64)


# --- ROIs -------------------------------------------------------------------------------------

def rois_from_labels(label_array: np.ndarray, names: Mapping[int, str] | None = None,
                     include_empty: bool = False) -> dict[str, np.ndarray]:
    """One boolean ROI per non-zero label value, in increasing label order.

    Names come from `names` (label value -> name, e.g. phantom.LABELS or a dseg.tsv), else
    "label_<value>". Label 0 is background and never an ROI. With include_empty, values named in
    `names` but absent from the array give empty ROIs (rows with count 0).
    """
    labels = np.asarray(label_array)
    if labels.dtype.kind == "f":
        if not np.all(np.isfinite(labels)) or not np.all(labels == np.round(labels)):
            raise InputError("The label map has non-integer values; give a label map "
                             "(integer values per region), not an intensity image.")
        labels = labels.astype(np.int64)
    values = {int(v) for v in np.unique(labels) if v != 0}
    if include_empty and names:
        values |= {int(k) for k in names if int(k) != 0}
    names = {int(k): str(v) for k, v in (names or {}).items()}
    return {names.get(v, f"label_{v}"): labels == v for v in sorted(values)}


def box_roi(shape: Sequence[int], ijk_to_world: np.ndarray, center: Sequence[float],
            size: Sequence[float], axes: np.ndarray | None = None) -> np.ndarray:
    """Boolean ROI of the voxels whose centres lie inside a box (e.g. a Slicer markups ROI).

    shape: the volume's (z, y, x) array shape. ijk_to_world: 4x4 matrix from (i, j, k) = (x, y, z)
    voxel indices to world mm (RAS or LPS: the box must be given in the same space). center and
    size: the box's centre and full side lengths in mm. axes: 3x3 matrix whose columns are the
    box's axes in world space (default: the world axes). Centres on a face count as inside.
    """
    m = np.asarray(ijk_to_world, dtype=np.float64)
    rot = np.eye(3) if axes is None else np.asarray(axes, dtype=np.float64)
    half = np.asarray(size, dtype=np.float64) / 2.0
    if m.shape != (4, 4) or rot.shape != (3, 3) or half.shape != (3,) or np.any(half < 0):
        raise InputError("A box ROI needs a 4x4 voxel-to-world matrix, a 3x3 axes matrix, and a "
                         "centre and three non-negative side lengths in mm.")
    # Voxel index -> box coordinates in one affine map; tolerance for centres exactly on a face.
    to_box = rot.T @ m[:3, :3]
    offset = rot.T @ (m[:3, 3] - np.asarray(center, dtype=np.float64))
    tol = 1e-6 * max(1.0, float(np.abs(m[:3, :3]).max()))
    nz, ny, nx = (int(n) for n in shape)
    j, i = np.meshgrid(np.arange(ny), np.arange(nx), indexing="ij")
    plane = np.stack([i.ravel(), j.ravel()]).astype(np.float64)  # (2, ny*nx)
    out = np.zeros((nz, ny, nx), bool)
    for k in range(nz):  # one slice at a time: memory stays small on 1 mm volumes
        c = to_box[:, :2] @ plane + (to_box[:, 2] * k + offset)[:, None]
        out[k] = np.all(np.abs(c) <= half[:, None] + tol, axis=0).reshape(ny, nx)
    return out


def read_label_names(tsv_path: str | os.PathLike) -> dict[int, str]:
    """Label value -> name from a BIDS dseg.tsv (columns `index` and `name`, tab separated)."""
    path = Path(tsv_path)
    try:
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f, delimiter="\t")
            if not reader.fieldnames or not {"index", "name"} <= set(reader.fieldnames):
                raise InputError(f"{path}: a label table needs tab-separated columns 'index' and "
                                 f"'name' (BIDS dseg.tsv); found {reader.fieldnames}.")
            return {int(row["index"]): row["name"].strip() for row in reader if row["index"].strip()}
    except OSError as exc:
        raise InputError(f"{path}: cannot read the label table ({exc.strerror}).") from None
    except ValueError:
        raise InputError(f"{path}: the 'index' column must hold integer label values.") from None


def contralateral_pairs(roi_names: Iterable[str]) -> dict[str, str]:
    """Lesion -> reference pairs found by name: "X" pairs with "contralateral_X" (the virtual
    patients' lesion map names them so)."""
    names = list(roi_names)
    return {n[len(CONTRALATERAL_PREFIX):]: n for n in names
            if n.startswith(CONTRALATERAL_PREFIX) and n[len(CONTRALATERAL_PREFIX):] in names}


# --- the table --------------------------------------------------------------------------------

def roi_statistics(maps: Mapping[str, np.ndarray], rois: Mapping[str, np.ndarray],
                   voxel_volume_ml: float, mask: np.ndarray | None = None,
                   reference: Mapping[str, np.ndarray] | None = None,
                   contrasts: Mapping[str, str] | None = None,
                   units: Mapping[str, str] | None = None,
                   interval_width: np.ndarray | None = None,
                   predicted: np.ndarray | Mapping[str, np.ndarray] | None = None) -> list[dict]:
    """Statistics per ROI and map: one row (a dict with the keys of COLUMNS) per ROI x map, ROIs in
    the order of `rois`, maps in the order of `maps`.

    maps: name -> 3D array (e.g. "OEF" in percent, "S0", "R2", "Y", "v", "chi_nb").
    rois: name -> boolean array (see rois_from_labels for a label map).
    voxel_volume_ml: volume of one voxel (see voxel_volume_ml(spacing)).
    mask: optional boolean array; ROIs are restricted to it.
    reference: optional name -> reference array (e.g. {"OEF": truth}); maps without one get NaN
        comparison columns.
    contrasts: optional lesion ROI name -> reference ROI name (e.g. contralateral_pairs(rois)).
    units: optional name -> unit; defaults to the physics units (OEF "%").
    interval_width: optional width of the 90 % OEF interval (pp, the prediction's OEF_width map);
        the OEF rows get its mean over the ROI in the `interval_width` column.
    predicted: optional boolean array (all maps) or map name -> array: the voxels the prediction
        predicted; the others are excluded (n_unpredicted). Maps missing from a dict use all voxels.
    All arrays must have the same shape (InputError naming the ones that differ).
    """
    reference = dict(reference or {})
    contrasts = dict(contrasts or {})
    if not maps:
        raise InputError("No maps given: give at least one map to measure.")
    unknown = [n for n in reference if n not in maps]
    if unknown:
        raise InputError(f"Reference map(s) {unknown} match no map; maps are {list(maps)}.")
    for lesion, ref in contrasts.items():
        missing = [n for n in (lesion, ref) if n not in rois]
        if missing:
            raise InputError(f"Contrast pair {lesion!r} vs {ref!r}: no ROI named {missing}; "
                             f"ROIs are {list(rois)}.")
    arrays = {f"map {k!r}": v for k, v in maps.items()}
    arrays.update({f"ROI {k!r}": v for k, v in rois.items()})
    arrays.update({f"reference {k!r}": v for k, v in reference.items()})
    if mask is not None:
        arrays["mask"] = mask
    if interval_width is not None:
        arrays["interval width"] = interval_width
    if predicted is not None and not isinstance(predicted, Mapping):
        predicted = dict.fromkeys(maps, predicted)
    predicted = {k: v for k, v in (predicted or {}).items() if v is not None}
    unknown = [n for n in predicted if n not in maps]
    if unknown:
        raise InputError(f"Prediction mask(s) for {unknown} match no map; maps are {list(maps)}.")
    arrays.update({f"prediction mask of {k!r}": v for k, v in predicted.items()})
    _check_shapes(arrays)
    if not (voxel_volume_ml > 0 and math.isfinite(voxel_volume_ml)):
        raise InputError(f"The voxel volume must be a positive number of mL, got {voxel_volume_ml}.")

    mask_b = None if mask is None else np.asarray(mask, dtype=bool)
    # Flat voxel indices of each ROI inside the mask: selecting by index is much cheaper than a
    # whole-volume boolean operation per ROI and map.
    index, n_outside = {}, {}
    for name, roi in rois.items():
        roi_b = np.asarray(roi, dtype=bool)
        inside = roi_b if mask_b is None else roi_b & mask_b
        index[name] = np.flatnonzero(inside)
        n_outside[name] = int(np.count_nonzero(roi_b)) - index[name].size
    units = {**{n: m.unit for n, m in maptable.MAPS.items()}, **(units or {})}
    flat_maps = {k: np.asarray(v).ravel() for k, v in maps.items()}
    flat_refs = {k: np.asarray(v).ravel() for k, v in reference.items()}
    flat_predicted = {k: np.asarray(v, dtype=bool).ravel() for k, v in predicted.items()}

    def map_values(map_name, roi_name):
        """The map's values in the ROI, NaN where it was not predicted; and the unpredicted count."""
        v = flat_maps[map_name][index[roi_name]].astype(np.float64)
        if map_name not in flat_predicted:
            return v, 0
        unpredicted = ~flat_predicted[map_name][index[roi_name]]
        v[unpredicted] = np.nan
        return v, int(np.count_nonzero(unpredicted))

    def finite_values(values):
        return values[np.isfinite(values)]

    rows = []
    for roi_name in rois:
        idx = index[roi_name]
        for map_name in flat_maps:
            values, n_unpredicted = map_values(map_name, roi_name)
            ok = np.isfinite(values)
            used = values[ok]
            row = dict.fromkeys(COLUMNS, _NAN)
            row.update(roi=roi_name, map=map_name, unit=units.get(map_name, ""),
                       n_voxels=int(idx.size), volume_ml=idx.size * float(voxel_volume_ml),
                       n_outside_mask=n_outside[roi_name], n_unpredicted=n_unpredicted,
                       n_nonfinite=int(idx.size - used.size - n_unpredicted),
                       n_valid=int(used.size), n_paired=0, contrast_reference="")
            row.update(describe(used))
            if interval_width is not None and map_name == "OEF":
                width = np.asarray(interval_width).ravel()[index[roi_name]].astype(np.float64)
                if "OEF" in flat_predicted:  # the width map is 0 where OEF was not predicted
                    width = width[flat_predicted["OEF"][index[roi_name]]]
                width = finite_values(width)
                row["interval_width"] = float(width.mean()) if width.size else _NAN
            if map_name in flat_refs:
                ref = flat_refs[map_name][idx].astype(np.float64)
                pair = ok & np.isfinite(ref)
                row.update(paired_statistics(values[pair], ref[pair]))
            if roi_name in contrasts:
                other = contrasts[roi_name]
                row["contrast_reference"] = other
                b = finite_values(map_values(map_name, other)[0])
                if used.size and b.size:
                    row["contrast"] = float(used.mean() - b.mean())
                row["cnr"] = cnr_from_values(used, b)
                if map_name in flat_refs:
                    row["reference_cnr"] = cnr_from_values(
                        finite_values(flat_refs[map_name][index[roi_name]].astype(np.float64)),
                        finite_values(flat_refs[map_name][index[other]].astype(np.float64)))
            rows.append(row)
    return rows


def _check_shapes(arrays: Mapping[str, np.ndarray]) -> None:
    shapes = {name: np.shape(a) for name, a in arrays.items()}
    first_name, first = next(iter(shapes.items()))
    if len(first) != 3:
        raise InputError(f"{first_name} has shape {first}; expected a 3D array (z, y, x).")
    for name, shape in shapes.items():
        if shape != first:
            raise InputError(f"{name} has shape {shape} but {first_name} has shape {first}; "
                             "all maps, ROIs and the mask must be on the same voxel grid.")


# --- output -----------------------------------------------------------------------------------

def _csv_cell(value) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else repr(value)  # repr: the exact float, round-trips
    return str(value)


def temporary_sibling(path: str | os.PathLike) -> Path:
    """A unique hidden name beside `path` for writing it atomically (write, then os.replace).
    Unlike tempfile.mkstemp, the file gets the usual permissions (umask), not 0600."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.partial")


def write_csv(rows: Sequence[Mapping], path: str | os.PathLike,
              columns: Sequence[str] = COLUMNS) -> Path:
    """Write the rows as CSV (header = columns; NaN as an empty cell; floats at full precision).
    Written to a temporary file beside `path` and renamed: an error leaves no partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    try:
        with open(tmp, "x", encoding="utf-8", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(columns)
            for row in rows:
                writer.writerow([_csv_cell(row.get(c, "")) for c in columns])
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_csv(path: str | os.PathLike) -> list[dict]:
    """Rows back from write_csv's file (counts as int, empty cells as NaN)."""
    rows = []
    with open(path, encoding="utf-8", newline="") as f:
        for raw in csv.DictReader(f):
            row = {}
            for key, text in raw.items():
                if key in TEXT_COLUMNS:
                    row[key] = text
                elif key in INT_COLUMNS:
                    row[key] = int(text)
                else:
                    row[key] = float(text) if text != "" else _NAN
            rows.append(row)
    return rows


def format_table(rows: Sequence[Mapping], columns: Sequence[str] | None = None,
                 digits: int = 4) -> str:
    """A Markdown table of the rows (floats to `digits` significant digits; NaN as "-").
    Default columns: the descriptive ones, plus comparison / contrast ones when any row has them."""
    if columns is None:
        columns = ["roi", "map", "n_voxels", "volume_ml", "mean", "sd", "median", "p05", "p95"]
        if any(np.isfinite(r.get("interval_width", _NAN)) for r in rows):
            columns += ["interval_width"]
        if any(r.get("n_paired", 0) for r in rows):
            columns += ["rmse", "bias", "pearson_r", "ba_loa_lower", "ba_loa_upper"]
        if any(r.get("contrast_reference") for r in rows):
            columns += ["contrast_reference", "cnr"]

    def cell(v):
        if isinstance(v, float):
            return "-" if math.isnan(v) else f"{v:.{digits}g}"
        return str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


# --- names from files ---------------------------------------------------------------------------

def map_name_from_path(path: str | os.PathLike) -> str:
    """Map name from a file name: oef.nii.gz -> OEF, chi_nb.nii.gz -> chi_nb, and the virtual
    patients' P01_desc-truth_OEFmap.nii.gz -> OEF; anything else -> the file's stem."""
    name = Path(path).name
    stem = re.sub(r"\.(nii\.gz|nii|nrrd|nhdr|mha|mhd|gz)$", "", name, flags=re.IGNORECASE)
    m = re.search(r"desc-truth_([A-Za-z0-9_]+?)map$", stem)
    return maptable.name_of_file(m.group(1) if m else stem) or stem
