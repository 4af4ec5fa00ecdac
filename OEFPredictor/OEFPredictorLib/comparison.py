"""The comparison figure: a map against its reference (ground truth) inside ROIs.

Prediction and reference side by side, their difference (diverging colour map, centred on 0), a
scatter plot (prediction vs reference, identity line, Pearson r) and a Bland-Altman plot of the
voxels inside the ROIs, and a small table of per-ROI agreement. The numbers come from roistats,
so they are the ones of the CSV.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import numpy as np

from . import roistats
from .figures import OEF_RANGE, _matplotlib, axial_slice, central_slice

MAX_SCATTER_POINTS = 20000  # display only: statistics always use every voxel
_ROI_COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
                "#7f7f7f", "#bcbd22", "#17becf"]


def _voxel_owner(rois: Mapping[str, np.ndarray], mask: np.ndarray) -> np.ndarray:
    """Index of the ROI each voxel is drawn as (-1: none). Where ROIs overlap (a lesion inside its
    tissue), the smallest wins, so lesions stay visible."""
    owner = np.full(mask.shape, -1, dtype=np.int32)
    sizes = [(int(np.count_nonzero(r & mask)), i) for i, r in enumerate(rois.values())]
    names = list(rois)
    for _, i in sorted(sizes, reverse=True):
        owner[rois[names[i]] & mask] = i
    return owner


def _display_subset(owner_values: np.ndarray, n_rois: int, rng) -> np.ndarray:
    """Indices of the points to draw: every point of small ROIs, a random share of large ones."""
    keep = []
    total = owner_values.size
    for i in range(n_rois):
        idx = np.flatnonzero(owner_values == i)
        cap = max(2000, int(MAX_SCATTER_POINTS * idx.size / max(total, 1)))
        keep.append(idx if idx.size <= cap else rng.choice(idx, cap, replace=False))
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, int)


def comparison_figure(out_png: str | os.PathLike, values: np.ndarray, reference: np.ndarray,
                      rois: Mapping[str, np.ndarray], mask: np.ndarray | None = None,
                      map_name: str = "OEF", unit: str = "%", slice_index: int | None = None,
                      focus_roi: str | None = None, title: str | None = None,
                      value_range: tuple[float, float] | None = None,
                      reference_label: str = "Reference", outline: list[str] | None = None,
                      contrasts: Mapping[str, str] | None = None) -> Path:
    """Write the comparison figure of `values` against `reference` inside `rois` (name -> bool
    array), restricted to `mask`. The axial slice goes through `focus_roi` (or all ROIs) unless
    slice_index is given. `outline`: the ROIs drawn as contours on the difference (default: those
    under 5 % of all ROI voxels, e.g. lesions). Written atomically (a temporary file renamed when
    complete). `contrasts` (lesion -> reference ROI) adds their CNRs under the table."""
    plt = _matplotlib()
    values = np.asarray(values, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    rois = {k: np.asarray(v, dtype=bool) for k, v in rois.items()}
    mask_b = np.ones(values.shape, bool) if mask is None else np.asarray(mask, dtype=bool)
    # The same checks and numbers as the table.
    rows = roistats.roi_statistics({map_name: values}, rois, 1.0, mask=mask,
                                   reference={map_name: reference}, contrasts=contrasts)
    ref_rows = roistats.roi_statistics({map_name: reference}, rois, 1.0, mask=mask)
    union = np.zeros(values.shape, bool)
    for r in rois.values():
        union |= r
    union &= mask_b
    x, y = roistats.paired_values(values, reference, union)
    overall = roistats.paired_statistics(x, y)

    if slice_index is None:
        focus = rois.get(focus_roi) if focus_roi else None
        focus = focus & mask_b if focus is not None and (focus & mask_b).any() else union
        slice_index = central_slice(focus if focus.any() else mask_b)
    k = axial_slice(slice_index, mask_b.shape[0])
    if value_range is None:
        if map_name == "OEF":
            value_range = OEF_RANGE
        else:
            finite = y[np.isfinite(y)]
            value_range = tuple(np.percentile(finite, [1, 99])) if finite.size else (0.0, 1.0)
    diff = roistats.difference_map(values, reference).astype(np.float64)
    shown = mask_b & np.isfinite(reference)
    d_lim = np.nanpercentile(np.abs(diff[union]), 99) if np.isfinite(diff[union]).any() else 1.0
    d_lim = float(d_lim) if d_lim > 0 else 1.0

    def axial(a):  # LPS arrays: anterior up, radiological left-right (as the montage)
        return np.where(shown, a, np.nan)[k][::-1]

    fig = plt.figure(figsize=(15, 9.5), constrained_layout=True)
    grid = fig.add_gridspec(2, 3, width_ratios=[1, 1, 1.25])
    unit_txt = f" ({unit})" if unit else ""
    panels = [(values, f"Prediction: {map_name}{unit_txt}", "inferno", value_range),
              (reference, f"{reference_label}: {map_name}{unit_txt}", "inferno", value_range),
              (diff, f"Difference (prediction - reference){unit_txt}", "RdBu_r", (-d_lim, d_lim))]
    names = list(rois)
    colours = {n: _ROI_COLOURS[i % len(_ROI_COLOURS)] for i, n in enumerate(names)}
    sizes = {n: int(np.count_nonzero(rois[n] & mask_b)) for n in names}
    if outline is None:
        outline = [n for n in names if 0 < sizes[n] < 0.05 * max(int(union.sum()), 1)]
    draw_order = sorted(range(len(names)), key=lambda i: -sizes[names[i]])  # small ROIs on top
    for col, (img, label, cmap, lim) in enumerate(panels):
        ax = fig.add_subplot(grid[0, col])
        im = ax.imshow(axial(img), cmap=cmap, vmin=lim[0], vmax=lim[1], interpolation="nearest")
        if col == 2:  # ROI outlines on the difference, coloured as in the plots
            for n in outline:
                roi_slice = (rois[n] & mask_b)[k][::-1]
                if roi_slice.any():
                    ax.contour(roi_slice.astype(float), levels=[0.5], colors=[colours[n]],
                               linewidths=1.6)
        ax.set_title(label, fontsize=10)
        ax.axis("off")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)

    owner = _voxel_owner(rois, mask_b)
    sel = union & np.isfinite(values) & np.isfinite(reference)
    owner_values = owner[sel]
    shown_idx = _display_subset(owner_values, len(names), np.random.default_rng(0))
    xs, ys, os_ = values[sel][shown_idx], reference[sel][shown_idx], owner_values[shown_idx]

    ax = fig.add_subplot(grid[1, 0])
    for i in draw_order:
        n = names[i]
        pick = os_ == i
        if pick.any():
            ax.scatter(ys[pick], xs[pick], s=3, alpha=0.4, color=colours[n], label=n.replace("_", " "),
                       rasterized=True, linewidths=0)
    lo = float(min(value_range[0], np.min(y) if y.size else value_range[0]))
    hi = float(max(value_range[1], np.max(y) if y.size else value_range[1]))
    ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="identity")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_aspect("equal")
    ax.set_xlabel(f"{reference_label}{unit_txt}")
    ax.set_ylabel(f"Prediction{unit_txt}")
    ax.set_title(f"Scatter: r = {overall['pearson_r']:.3f}, "
                 f"RMSE = {overall['rmse']:.3g}{unit and ' ' + unit} (n = {overall['n_paired']})",
                 fontsize=10)
    ax.legend(fontsize=7, markerscale=3, loc="upper left")

    ax = fig.add_subplot(grid[1, 1])
    for i in draw_order:
        n = names[i]
        pick = os_ == i
        if pick.any():
            ax.scatter((xs[pick] + ys[pick]) / 2, xs[pick] - ys[pick], s=3, alpha=0.4,
                       color=colours[n], rasterized=True, linewidths=0)
    for level, style, text in [(overall["ba_mean_diff"], "-", "mean"),
                               (overall["ba_loa_lower"], "--", "-1.96 SD"),
                               (overall["ba_loa_upper"], "--", "+1.96 SD")]:
        if np.isfinite(level):
            ax.axhline(level, color="k", ls=style, lw=1)
            ax.annotate(f"{text}: {level:.3g}", xy=(0.0, level), xycoords=("axes fraction", "data"),
                        xytext=(4, 3), textcoords="offset points", ha="left", fontsize=8)
    ax.set_xlabel(f"Mean of prediction and reference{unit_txt}")
    ax.set_ylabel(f"Prediction - reference{unit_txt}")
    ax.set_title("Bland-Altman (limits of agreement: mean +- 1.96 SD)", fontsize=10)

    ax = fig.add_subplot(grid[1, 2])
    ax.axis("off")
    cell = lambda v: "-" if not np.isfinite(v) else f"{v:.3g}"  # noqa: E731
    short = lambda n: n if len(n) <= 26 else n[:25] + "\u2026"  # noqa: E731
    table_rows = [[short(r["roi"].replace("_", " ")), str(r["n_valid"]), cell(r["mean"]), cell(rr["mean"]),
                   cell(r["bias"]), cell(r["rmse"]), cell(r["pearson_r"])]
                  for r, rr in zip(rows, ref_rows)]
    tab = ax.table(cellText=table_rows, colLabels=["ROI", "n", "mean", "ref", "bias", "RMSE", "r"],
                   loc="upper center", cellLoc="right", colLoc="right",
                   colWidths=[0.34, 0.12, 0.1, 0.1, 0.12, 0.1, 0.1])
    tab.auto_set_font_size(False)
    tab.set_fontsize(8)
    tab.scale(1.0, 1.3)
    for i, n in enumerate(names):
        tab[i + 1, 0].get_text().set_color(colours[n])
        tab[i + 1, 0].set_text_props(ha="left")
        tab[i + 1, 0].PAD = 0.03
    ax.set_title(f"Per ROI ({map_name}{unit_txt}; ref = the reference's mean)", fontsize=10)
    lines = [f"CNR {r['roi'].replace('_', ' ')} vs {r['contrast_reference'].replace('_', ' ')}: "
             f"prediction {cell(r['cnr'])}, reference {cell(r['reference_cnr'])}"
             for r in rows if r["contrast_reference"]]
    if lines:
        ax.text(0.02, 0.02, "\n".join(lines), transform=ax.transAxes, fontsize=8, va="bottom")

    fig.suptitle(title or f"{map_name}: prediction vs {reference_label.lower()}, axial slice {k}")
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    tmp = roistats.temporary_sibling(out_png)
    try:
        fig.savefig(tmp, dpi=90, format="png")
        os.replace(tmp, out_png)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)
    return out_png
