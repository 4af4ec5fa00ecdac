"""`oefpredictor stats`: ROI statistics of maps, optionally against a reference (ground truth),
as a table (stdout), a CSV and a comparison figure. The numbers are roistats.roi_statistics's,
the same as the Slicer module's table."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from ..errors import InputError

EPILOG = """Map names come from the file names (oef.nii.gz -> OEF, S0, R2, Y, v, chi_nb; the virtual
patients' *_desc-truth_OEFmap.nii.gz -> OEF); a --truth file is the reference of the map with the
same name (or of the only map). ROIs are the non-zero label values of each --labels file, named from
the BIDS dseg.tsv beside it when there is one. Lesion ROIs named X get their contrast-to-noise ratio
against an ROI named contralateral_X (the virtual patients' lesion map), or against the ROI given
with --contrast X:REFERENCE.
example: oefpredictor stats --map demo_output/oef.nii.gz --labels P03_desc-lesions_dseg.nii.gz
         --truth P03_desc-truth_OEFmap.nii.gz --out stats.csv --figure stats.png"""


def register(sub):
    import argparse

    p = sub.add_parser("stats", help="ROI statistics and comparison with a reference map",
                       description="Per ROI and map: voxel count, volume, mean, SD (ddof=1), median, "
                                   "min, max, 5th/95th percentiles; with --truth also RMSE, MAE, bias, "
                                   "Pearson r and Bland-Altman limits of agreement; lesion "
                                   "contrast-to-noise.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--map", nargs="+", required=True, metavar="FILE", help="map(s) to measure")
    p.add_argument("--labels", nargs="+", required=True, metavar="FILE",
                   help="label map(s): each non-zero value is an ROI")
    p.add_argument("--truth", nargs="+", default=[], metavar="FILE",
                   help="reference (ground-truth) map(s), matched to --map by name")
    p.add_argument("--mask", metavar="FILE", help="restrict the ROIs to this mask (non-zero voxels)")
    p.add_argument("--prediction-mask", metavar="FILE",
                   help="the voxels the maps were predicted in; the others (0 in the maps, not 0 %%) are left "
                        "out and counted in n_unpredicted. Default: mask.nii.gz beside a map that "
                        "`oefpredictor predict` wrote (with its prediction.json)")
    p.add_argument("--no-prediction-mask", action="store_true",
                   help="use every voxel of the maps, 0 included (no prediction mask)")
    p.add_argument("--label-names", nargs="+", default=[], metavar="TSV",
                   help="BIDS dseg.tsv (index, name) per --labels file (default: the .tsv beside it)")
    p.add_argument("--contrast", action="append", default=[], metavar="LESION:REFERENCE",
                   help="ROI names of a lesion and its reference region for the contrast-to-noise "
                        "ratio (repeatable; contralateral_X pairs with X without it)")
    p.add_argument("--out", metavar="CSV", help="write the table as CSV (one row per ROI and map)")
    p.add_argument("--figure", metavar="PNG", help="write the comparison figure (needs --truth)")
    p.add_argument("--figure-map", metavar="NAME", help="the map the figure shows (default OEF, or the "
                                                        "first map with a reference)")
    p.add_argument("--title", help="title of the figure")
    p.add_argument("--slice", type=int, default=None, help="axial slice of the figure (default: "
                                                          "through the first lesion, or the ROIs)")
    p.set_defaults(func=run)


def describe_geometry(shape, geometry, direction: bool = False) -> str:
    """One line: size (x, y, z), spacing, origin (and direction, when that is what differs)."""
    from .. import io

    size = "x".join(str(s) for s in reversed(shape))
    spacing = "x".join(f"{s:g}" for s in geometry.spacing)
    origin = ", ".join(f"{o:g}" for o in geometry.origin)
    text = f"size {size}, spacing {spacing} mm, origin ({origin})"
    return text + ", " + io.describe_direction(geometry) if direction else text


def _read_all(paths: list[tuple[str, Path]]):
    """Read every image; all must share the first one's grid (shape and geometry)."""
    from .. import io

    images = {}
    first = None
    for role, path in paths:
        array, geometry = io.read_volume(path, dtype=np.float64)
        if array.ndim != 3:
            raise InputError(f"{path} is {array.ndim}D with shape {array.shape}; give a 3D map.")
        if first is None:
            first = (path, array.shape, geometry)
        elif array.shape != first[1] or not geometry.matches(first[2]):
            d = io.grids_differ_in_direction(geometry, first[2])
            raise InputError(f"{path} ({role}) has {describe_geometry(array.shape, geometry, d)} but "
                             f"{first[0]} has {describe_geometry(first[1], first[2], d)}; resample them "
                             "onto one grid.")
        images[(role, path)] = array
    return images, first[2]


def prediction_mask_beside(map_path: Path) -> Path | None:
    """mask.nii.gz beside a map in an output folder of `oefpredictor predict` (or demo): the voxels
    predicted. None elsewhere."""
    from ..maptable import MASK_FILE, PROVENANCE_FILE

    folder = Path(map_path).parent
    if (folder / PROVENANCE_FILE).exists() and (folder / MASK_FILE).exists():
        return folder / MASK_FILE
    return None


def _label_names(labels_path: Path, explicit: str | None) -> dict[int, str] | None:
    from .. import roistats

    if explicit:
        return roistats.read_label_names(explicit)
    name = labels_path.name
    for suffix in (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd"):
        if name.endswith(suffix):
            tsv = labels_path.with_name(name[: -len(suffix)] + ".tsv")
            return roistats.read_label_names(tsv) if tsv.exists() else None
    return None


def _unique_names(paths, what) -> dict[str, Path]:
    from .. import roistats

    named = {}
    for path in paths:
        name = roistats.map_name_from_path(path)
        if name in named:
            raise InputError(f"{what} {named[name]} and {path} are both named {name!r} (from their "
                             "file names); give one map per name.")
        named[name] = Path(path)
    return named


def _check_output(path: str | None, what: str, suffix: str) -> Path | None:
    from .. import io

    if path is None:
        return None
    path = Path(path)
    if path.suffix.lower() != suffix:
        raise InputError(f"{what} {path} should end in {suffix}.")
    if path.is_dir():
        raise InputError(f"{what} {path} is a folder; give a file name.")
    io.check_writable_parent(path)
    return path


def run(args) -> int:
    from .. import maptable, roistats

    maps = _unique_names(args.map, "--map")
    truths = _unique_names(args.truth, "--truth")
    known = set(maptable.MAPS)
    if (len(maps) == 1 and len(truths) == 1
            and (set(maps) == set(truths) or not (set(maps) | set(truths)) <= known)):
        # One of each pairs unless the names say they are different maps (e.g. R2 and OEF).
        truth_of = {next(iter(maps)): next(iter(truths.values()))}
    else:
        unmatched = [n for n in truths if n not in maps]
        if unmatched:
            raise InputError(f"--truth map(s) {unmatched} match no --map (maps: {list(maps)}); "
                             "name the files after their map (e.g. oef.nii.gz).")
        truth_of = dict(truths)
    if args.label_names and len(args.label_names) != len(args.labels):
        raise InputError(f"--label-names needs one table per --labels file ({len(args.labels)}), "
                         f"got {len(args.label_names)}.")
    out_csv = _check_output(args.out, "--out", ".csv")
    out_png = _check_output(args.figure, "--figure", ".png")
    if out_csv and out_png and out_csv.absolute() == out_png.absolute():
        raise InputError("--out and --figure name the same file.")
    if out_png and not truth_of:
        raise InputError("--figure compares a map with its reference: give --truth too.")
    figure_map = args.figure_map
    if out_png:
        if figure_map is None:
            figure_map = "OEF" if "OEF" in truth_of else next(iter(truth_of))
        elif figure_map not in truth_of:
            raise InputError(f"--figure-map {figure_map}: no such map with a --truth "
                             f"(maps with a reference: {list(truth_of)}).")

    if args.prediction_mask and args.no_prediction_mask:
        raise InputError("--prediction-mask and --no-prediction-mask contradict each other; give one.")
    prediction_masks = {} if args.no_prediction_mask else {
        n: Path(args.prediction_mask) if args.prediction_mask else prediction_mask_beside(p) for n, p in maps.items()}
    prediction_masks = {n: p for n, p in prediction_masks.items() if p is not None}

    # Read everything (and check the grids) before writing anything.
    to_read = [("map", p) for p in maps.values()] + [("labels", Path(p)) for p in args.labels]
    to_read += [("truth", p) for p in truth_of.values()]
    to_read += [("prediction mask", p) for p in dict.fromkeys(prediction_masks.values())]
    if args.mask:
        to_read.append(("mask", Path(args.mask)))
    images, geometry = _read_all(to_read)
    map_arrays = {n: images[("map", p)] for n, p in maps.items()}
    predicted = {n: images[("prediction mask", p)] > 0 for n, p in prediction_masks.items()}
    reference = {n: images[("truth", p)] for n, p in truth_of.items()}
    mask = images[("mask", Path(args.mask))] > 0 if args.mask else None
    if args.slice is not None:  # before the table is printed: an error leaves nothing half done
        from ..figures import axial_slice

        axial_slice(args.slice, next(iter(map_arrays.values())).shape[0])

    rois = {}
    for i, lp in enumerate(args.labels):
        lp = Path(lp)
        names = _label_names(lp, args.label_names[i] if args.label_names else None)
        for name, roi in roistats.rois_from_labels(images[("labels", lp)], names).items():
            if name in rois:  # the same name in two label files: say which file
                name = f"{name} ({lp.name})"
            rois[name] = roi
    if not rois:
        raise InputError(f"{', '.join(args.labels)}: no non-zero labels, so no ROI to measure.")
    contrasts = roistats.contralateral_pairs(rois)
    for text in args.contrast:
        lesion, sep, ref = text.partition(":")
        if not sep or not lesion or not ref:
            raise InputError(f"--contrast {text!r}: give LESION:REFERENCE (two ROI names).")
        contrasts[lesion] = ref

    # the 90 % OEF interval's bounds (predict's oef_p05 / oef_p95) give the OEF rows their mean width
    width = map_arrays["OEF_p95"] - map_arrays["OEF_p05"] if {"OEF_p05", "OEF_p95"} <= set(map_arrays) else None
    rows = roistats.roi_statistics(map_arrays, rois, roistats.voxel_volume_ml(geometry.spacing),
                                   mask=mask, reference=reference, contrasts=contrasts, interval_width=width,
                                   predicted=predicted)
    print(roistats.format_table(rows), end="")

    # Outputs: render the figure in a temporary folder first, so that an error leaves no file.
    tmp_dir = tempfile.mkdtemp(prefix="oefpredictor-stats-") if out_png else None
    try:
        if out_png:
            from .. import comparison

            # Outline the lesions and their reference regions (all ROIs when there are none).
            outline = [n for pair in contrasts.items() for n in pair] or None
            unit = next(r["unit"] for r in rows if r["map"] == figure_map)
            comparison.comparison_figure(Path(tmp_dir) / "figure.png", map_arrays[figure_map],
                                         reference[figure_map], rois, mask=mask, map_name=figure_map,
                                         unit=unit, slice_index=args.slice,
                                         focus_roi=next(iter(contrasts), None), title=args.title,
                                         reference_label="Truth", outline=outline,
                                         contrasts=contrasts)
        if out_csv:
            roistats.write_csv(rows, out_csv)
            print(f"Wrote {out_csv}")
        if out_png:
            _move(Path(tmp_dir) / "figure.png", out_png)
            print(f"Wrote {out_png}")
    finally:
        if tmp_dir:
            shutil.rmtree(tmp_dir, ignore_errors=True)
    return 0


def _move(src, dst: Path) -> None:
    """Move across folders atomically: copy beside the destination, then rename."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    from ..roistats import temporary_sibling

    tmp = temporary_sibling(dst)
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
