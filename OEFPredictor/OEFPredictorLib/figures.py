"""Figures (matplotlib, no display needed)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from . import phantom
from .errors import InputError
from .maptable import MAPS, OEF_RANGE

WIDTH_RANGE = MAPS["OEF_width"].display_range  # the 90 % interval's width (pp)


def _matplotlib():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def central_slice(mask: np.ndarray, axis: int = 0) -> int:
    """Index of the slice (along `axis`) through the centre of mass of the mask."""
    counts = mask.sum(axis=tuple(a for a in range(mask.ndim) if a != axis))
    if counts.sum() == 0:
        return mask.shape[axis] // 2
    return int(round(np.average(np.arange(len(counts)), weights=counts)))


def axial_slice(index, depth: int) -> int:
    """A user's axial slice index, checked against the volume's `depth` (slices 0 to depth-1;
    negative indices are refused, not counted from the end)."""
    if not 0 <= int(index) < depth:
        raise InputError(f"--slice {index} is out of range: the volume has {depth} axial slices, "
                         f"numbered 0 to {depth - 1}.")
    return int(index)


def montage_path(out: str | Path, patient: str) -> Path:
    """The PNG that `montage --out OUT` writes: OUT itself (.png added when it has no suffix), or
    OUT/<patient>_montage.png when OUT is a folder (existing, or given with a trailing slash)."""
    text = str(out)
    out = Path(out)
    if out.is_dir() or text.endswith(("/", "\\")):
        return out / f"{patient}_montage.png"
    if out.suffix == "":
        return out.with_name(out.name + ".png")
    if out.suffix.lower() != ".png":
        raise InputError(f"--out {out}: the montage is a PNG; give a file name ending in .png or a folder.")
    return out


def lesion_slice(lesion_map: np.ndarray | None, mask: np.ndarray) -> int:
    """The axial slice that shows both lesion kinds (misery perfusion and infarct core) with the most
    lesion voxels; else the one with the most lesion voxels; the brain's central slice without lesions."""
    if lesion_map is None or not np.any((lesion_map == 1) | (lesion_map == 2)):
        return central_slice(mask)
    penumbra, core = ((lesion_map == code).sum(axis=(1, 2)) for code in (1, 2))
    both = (penumbra > 0) & (core > 0)
    return int(np.argmax(np.where(both, penumbra + core, -1) if both.any() else penumbra + core))


def outline_lesions(ax, lesion_slice_map: np.ndarray) -> None:
    """Contours of the lesions (1 misery perfusion: white, 2 infarct core: cyan) on an image axis."""
    for code, colour in ((1, "white"), (2, "cyan")):
        region = (lesion_slice_map == code).astype(float)
        if region.any():
            ax.contour(region, levels=[0.5], colors=colour, linewidths=0.8)


def method_comparison(data, maps_by_method: dict, out_png: str | Path, labels: dict | None = None) -> Path:
    """One lesion slice: truth OEF, each method's OEF, and the interval width of those that give one."""
    plt = _matplotlib()
    k = lesion_slice(data.lesion_map, data.mask)
    show = data.metric_mask
    flip = lambda a: np.where(show[k], a[k], np.nan)[::-1]
    panels = [("Truth OEF (%)", data.truth["OEF"], "oef")]
    for name, maps in maps_by_method.items():
        panels.append((f"{(labels or {}).get(name, name)} OEF (%)", maps["OEF"], "oef"))
    for name, maps in maps_by_method.items():
        if "OEF_width" in maps:
            panels.append((f"{(labels or {}).get(name, name)}: 90 % interval width (pp)", maps["OEF_width"], "width"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.6), constrained_layout=True)
    for ax, (title, volume, kind) in zip(np.atleast_1d(axes), panels):
        cmap, (lo, hi) = ("inferno", OEF_RANGE) if kind == "oef" else ("viridis", WIDTH_RANGE)
        im = ax.imshow(flip(volume), cmap=cmap, vmin=lo, vmax=hi, interpolation="nearest")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
        outline_lesions(ax, data.lesion_map[k][::-1])
        ax.set_title(title, fontsize=10)
        ax.axis("off")
    fig.suptitle(f"{data.pid}, axial slice {k}: misery perfusion outlined white, infarct core cyan "
                 f"({(data.sidecar or {}).get('Noise', '')})")
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=90)
    plt.close(fig)
    return out_png


def label_colormap():
    from matplotlib.colors import ListedColormap

    colours = ["#000000", "#9e9e9e", "#f5f5f5", "#4daf4a", "#984ea3", "#377eb8", "#e41a1c", "#ff7f00"]
    return ListedColormap(colours)


def patient_montage(patient_dir: str | Path, out_png: str | Path, slice_index: int | None = None) -> Path:
    """Echo 1, QSM, truth OEF and labels of one virtual patient on an axial slice."""
    from . import simulate

    plt = _matplotlib()
    data = simulate.load_patient(patient_dir)
    if slice_index is None:
        k = central_slice(data.lesion_map > 0 if data.lesion_map.any() else data.mask)
    else:
        k = axial_slice(slice_index, data.mask.shape[0])
    flip = lambda a: a[k][::-1]  # LPS arrays: show anterior up (radiological left-right)
    fig, axes = plt.subplots(1, 4, figsize=(16, 4.6), constrained_layout=True)
    panels = [
        (flip(data.echoes[..., 0]), "Echo 1 magnitude (a.u.)", "gray", None),
        (flip(np.where(data.mask, data.qsm * 1000, np.nan)), "QSM (ppb)", "RdBu_r", (-150, 150)),
        (flip(np.where(data.metric_mask, data.truth["OEF"], np.nan)), "Truth OEF (%)", "inferno", OEF_RANGE),
        (flip(data.labels), "Tissue / lesion labels", label_colormap(), (-0.5, 7.5)),
    ]
    for ax, (img, title, cmap, lim) in zip(axes, panels):
        im = ax.imshow(img, cmap=cmap, vmin=None if lim is None else lim[0], vmax=None if lim is None else lim[1],
                       interpolation="nearest")
        ax.set_title(title)
        ax.axis("off")
        cb = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
        if title.startswith("Tissue"):
            cb.set_ticks(range(8))
            cb.set_ticklabels([phantom.LABELS[i].replace("_", " ") for i in range(8)], fontsize=7)
    snr = data.sidecar.get("Noise", "")
    fig.suptitle(f"Virtual patient {data.pid}, axial slice {k} ({data.protocol.describe()}; {snr})")
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=90)
    plt.close(fig)
    return out_png
