"""`oefpredictor demo`: the README's main job on the bundled demo patient.

Simulates the deterministic demo patient (stroke-like: lesions of both kinds), predicts its maps with
the default method (the spatial context network, with its 90 % OEF interval; --method lstm for the
paper's LSTM)
and writes the `predict` outputs (DIR/oef.nii.gz, S0, R2, Y, v, chi_nb, quality, prediction.json),
DIR/demo_figure.png, DIR/roi_stats.csv and DIR/patient/P03/ (the inputs and the truth), then
prints the OEF error against the truth.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from .. import methods

# The demo patient: deterministic, 2 mm (about 250 000 brain voxels: about a minute with the paper's
# LSTM on 2 CPU cores, seconds with the spatial models), a stroke-like patient with lesions.
DEMO_SEED = 2024
DEMO_VOXEL_SIZE = 2.0
DEMO_SNR = 100.0


def register(sub):
    p = sub.add_parser("demo", help="run the main job on the demo patient",
                       description="Simulate the demo virtual patient (deterministic, 2 mm, SNR 100), predict its "
                                   "OEF maps with the bundled model, and write maps, a figure and ROI statistics.")
    p.add_argument("--out", default="demo_output", help="output folder (default demo_output)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto", help="auto (default), cpu or gpu")
    p.add_argument("--method", default=None, choices=list(methods.METHODS), type=str.lower,
                   help=f"OEF method (default {methods.DEFAULT_METHOD}); e.g. lstm for the paper's model")
    # for tests and development: another model, a coarser patient
    p.add_argument("--model", default=None, help=argparse.SUPPRESS)
    p.add_argument("--voxel-size", type=float, default=DEMO_VOXEL_SIZE, help=argparse.SUPPRESS)
    p.set_defaults(func=run)


def make_demo_patient(folder: Path, voxel_size: float = DEMO_VOXEL_SIZE) -> Path:
    """Simulate the demo patient into folder/P03 and return that patient folder."""
    from .. import simulate

    simulate.simulate_dataset(folder, n_patients=1, seed=DEMO_SEED, voxel_size=voxel_size,
                              noise=simulate.NoiseModel(snr=DEMO_SNR, qsm_noise_ppb=2.0),
                              independent_fraction=0.0, lesions=True, first_index=3, overwrite=True,
                              cohort="stroke")
    return folder / "P03"


def demo_figure(data, maps: dict, out_png: Path, method: str = methods.DEFAULT_METHOD) -> Path:
    """Echo 1 with the OEF overlay, truth OEF, predicted OEF, the 90 % interval's width (methods
    that give one) and the difference, on the axial slice with the most lesion voxels."""
    from .. import figures
    from ..maptable import PERCENTAGE_POINTS

    plt = figures._matplotlib()
    k = figures.lesion_slice(data.lesion_map, data.mask)
    show = data.metric_mask
    flip = lambda a: a[k][::-1]  # LPS arrays: anterior up
    pred = np.where(show, maps["OEF"], np.nan)
    truth = np.where(show, data.truth["OEF"], np.nan)
    panels = 5 if "OEF_width" in maps else 4
    fig, axes = plt.subplots(1, panels, figsize=(4.3 * panels, 4.6), constrained_layout=True)
    lo, hi = figures.OEF_RANGE
    axes[0].imshow(flip(data.echoes[..., 0]), cmap="gray", interpolation="nearest")
    im = axes[0].imshow(flip(pred), cmap="inferno", vmin=lo, vmax=hi, alpha=0.6, interpolation="nearest")
    fig.colorbar(im, ax=axes[0], fraction=0.046, pad=0.02, label="OEF (%)")
    axes[0].set_title("Echo 1 + predicted OEF")
    label = methods.get(method).label
    for ax, img, title in ((axes[1], truth, "Truth OEF (%)"), (axes[2], pred, f"Predicted OEF (%), {label}")):
        im = ax.imshow(flip(img), cmap="inferno", vmin=lo, vmax=hi, interpolation="nearest")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
        ax.set_title(title)
        figures.outline_lesions(ax, flip(data.lesion_map))
    if "OEF_width" in maps:
        im = axes[3].imshow(flip(np.where(show, maps["OEF_width"], np.nan)), cmap="viridis", vmin=0,
                            vmax=figures.WIDTH_RANGE[1], interpolation="nearest")
        fig.colorbar(im, ax=axes[3], fraction=0.046, pad=0.02, label=figures.MAPS["OEF_width"].unit)
        axes[3].set_title("90 % interval width")
    im = axes[-1].imshow(flip(pred - truth), cmap="RdBu_r", vmin=-20, vmax=20, interpolation="nearest")
    fig.colorbar(im, ax=axes[-1], fraction=0.046, pad=0.02, label=PERCENTAGE_POINTS)
    axes[-1].set_title("Predicted - truth OEF")
    for ax in axes:
        ax.axis("off")
    rmse = float(np.sqrt(np.nanmean((pred - truth)[show] ** 2)))
    fig.suptitle(f"Demo patient {data.pid}, axial slice {k} (lesions outlined): OEF RMSE {rmse:.1f} points over "
                 f"the brain (CSF excluded; {data.sidecar.get('Noise', '')})")
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=90)
    plt.close(fig)
    return out_png


def roi_table(data, maps: dict, out_csv: Path) -> list[dict]:
    """Per tissue and lesion: statistics of the predicted maps and their error against the truth."""
    from .. import phantom, roistats

    # tissues from the label map; lesions (once) and their mirrors from the lesion map
    tissue_labels = {k: v for k, v in phantom.LABELS.items() if k not in phantom.LESION_LABELS.values()}
    rois = roistats.rois_from_labels(np.where(np.isin(data.labels, list(tissue_labels)), data.labels, 0), tissue_labels)
    lesions = roistats.rois_from_labels(data.lesion_map, phantom.LESION_MAP_LABELS)
    rois.update({k: v for k, v in lesions.items() if k != "none"})
    names = ("OEF", "R2", "Y", "v", "chi_nb")
    rows = roistats.roi_statistics({n: maps[n] for n in names}, rois,
                                   roistats.voxel_volume_ml(data.geometry.spacing), mask=data.mask,
                                   reference={n: data.truth[n] for n in names},
                                   contrasts=roistats.contralateral_pairs(rois),
                                   interval_width=maps.get("OEF_width"))
    roistats.write_csv(rows, out_csv)
    return rows


def run(args) -> int:
    from .. import files, io, maptable, predict, simulate
    from .predict import run_prediction

    start = time.perf_counter()
    out = Path(args.out)
    io.check_output_dir(out, args.overwrite)  # before any work
    method, _ = predict.resolve_method(args.method, args.model)  # fails early, in one line
    with io.atomic_directory(out, overwrite=args.overwrite, command="demo") as tmp:
        tmp = Path(tmp)
        print(f"Simulating the demo patient ({args.voxel_size:g} mm, SNR {DEMO_SNR:g}, seed {DEMO_SEED})...",
              flush=True)
        data = simulate.load_patient(make_demo_patient(tmp / "patient", args.voxel_size))
        inputs = predict.PredictionInputs(data.echoes, data.qsm, data.protocol, mask=data.mask,
                                          spacing=data.geometry.spacing)
        predictor = predict.Predictor.build(data.protocol, method.name, args.model)
        result = run_prediction(inputs, predictor, args.device, bar_label="Predicting OEF")
        files.write_maps(result, data.geometry, tmp)
        io.write_json(files.provenance(result, {"patient": "patient/P03", "seed": DEMO_SEED}, data.protocol),
                      tmp / maptable.PROVENANCE_FILE)
        demo_figure(data, result.maps, tmp / "demo_figure.png", method.name)
        rows = roi_table(data, result.maps, tmp / "roi_stats.csv")
    sel = data.metric_mask
    err = result.maps["OEF"][sel] - data.truth["OEF"][sel]
    print(f"Demo patient {data.pid}: {result.n_voxels} brain voxels predicted in {result.elapsed_s:.1f} s on the "
          f"{result.device.upper()}; OEF RMSE {np.sqrt(np.mean(err ** 2)):.2f} points, bias {err.mean():+.2f} "
          "(brain without CSF).")
    print(f"{'ROI':<34}{'voxels':>8}{'pred OEF %':>12}{'truth OEF %':>13}{'RMSE':>7}")
    for row in rows:
        if row["map"] == "OEF" and row["roi"] != "CSF" and row["n_valid"]:
            truth_mean = row["mean"] - row["bias"]  # bias = mean(prediction - truth) on the same voxels
            print(f"{row['roi']:<34}{row['n_valid']:>8}{row['mean']:>12.1f}{truth_mean:>13.1f}{row['rmse']:>7.1f}")
    interval = ", its 90 % interval oef_p05 / oef_p95" if "OEF_p05" in result.maps else ""
    print(f"Wrote {out}/oef.nii.gz{interval} (and S0, R2, Y, v, chi_nb, quality), {out}/demo_figure.png, {out}/roi_stats.csv in "
          f"{time.perf_counter() - start:.0f} s.")
    return 0

