"""Does anything in the data tell where the 90 % OEF interval misses lesion voxels? Three per-voxel features,
each tried as a third Mondrian axis of the card's calibration (half-width x predicted abnormality x feature):

    .venv/bin/python benchmarks/interval_features.py [--model M.keras] [--patients 24] [--dev-patients 12]

- "residual": where the data contradict the prediction, the RMS misfit between the measured echoes and the QQ
  forward model of the predicted parameters (relative to echo 1), smoothed over 2 mm and divided by the brain's
  median (so it does not follow the noise level);
- "r2star": |R2* - the brain's median| / median, R2* from a log-linear fit of the echoes (lesions change the
  decay even where the network maps them near normal);
- "qsm": |QSM - the brain's median| (ppm).
Per feature: on development patients, the share of lesion voxels and the card-like interval's coverage of brain
and lesion voxels in quantile bins of the feature (0-50-80-95-100 %, edges from the calibration patients); then
the interval calibrated with the feature bins as a third axis, measured on both sets. Patients as in
benchmarks/interval_lesions.py: the calibration seed (303, population priors; the card's interval scale is
refitted on them) and a development seed (9801, wide priors). Not test data. Writes
benchmarks/results/interval_features.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "OEFPredictor"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

FEATURE_QUANTILES = (0.5, 0.8, 0.95)
SMOOTHING_VOXELS = 1.0  # the residual's Gaussian sigma (2 mm at the model's grid)


def features(echoes, qsm, mask, protocol, out) -> dict:
    """Per mask voxel: the forward-model residual, the R2* deviation and the QSM deviation (module docstring)."""
    from scipy import ndimage

    from OEFPredictorLib import physics

    measured = echoes[mask].astype(np.float64)
    modelled = physics.qbold_signal(out["S0"], out["R2"], out["Y"], out["v"], out["chi_nb"], protocol)
    misfit = np.zeros(mask.shape)
    misfit[mask] = np.sqrt(np.mean(((measured - modelled) / measured[:, :1]) ** 2, axis=1))
    weight = np.maximum(ndimage.gaussian_filter(mask.astype(float), SMOOTHING_VOXELS), 1e-3)
    residual = ndimage.gaussian_filter(misfit, SMOOTHING_VOXELS)[mask] / weight[mask]
    centred = protocol.te - protocol.te.mean()
    logs = np.log(np.maximum(measured, 1e-9))
    r2star = -(logs - logs.mean(axis=1, keepdims=True)) @ centred / (centred @ centred)
    return {"residual": residual / np.median(residual),
            "r2star": np.abs(r2star - np.median(r2star)) / np.median(r2star),
            "qsm": np.abs(qsm[mask] - np.median(qsm[mask]))}


FEATURES = ("residual", "r2star", "qsm")


def pooled(volumes, scale_fit) -> dict:
    """interval_lesions.pooled (the voxels in one table, with each one's volume scale), with the features."""
    from interval_lesions import pooled as voxels

    return {**voxels(volumes, scale_fit), **{k: np.concatenate([v[k] for v in volumes]) for k in FEATURES}}


def axes(table, width_edges, feature, feature_edges):
    from OEFPredictorLib.training import calibration

    return (np.searchsorted(calibration.ABNORMALITY_EDGES_PP, table["abnormal"]),
            np.searchsorted(width_edges, table["widths"]),
            np.searchsorted(feature_edges, table[feature]) if feature else np.zeros(len(table["scores"]), int))


def fit(table, width_edges, feature=None, feature_edges=()) -> np.ndarray:
    """(abnormality, width, feature) bins of conformal factors on the scores relative to the volume scale."""
    from OEFPredictorLib.training import calibration

    bins = axes(table, width_edges, feature, feature_edges)
    relative = table["scores"] / table["scale"]
    factors = np.full((len(calibration.ABNORMALITY_EDGES_PP) + 1, len(width_edges) + 1, len(feature_edges) + 1),
                      calibration.conformal_factor(relative))
    for index in np.ndindex(factors.shape):
        inside = np.all([b == i for b, i in zip(bins, index)], axis=0)
        if inside.sum() >= calibration.MIN_BIN_VOXELS:
            factors[index] = calibration.conformal_factor(relative[inside])
    return factors


def covered(table, factors, width_edges, feature=None, feature_edges=()) -> tuple[np.ndarray, np.ndarray]:
    factor = factors[axes(table, width_edges, feature, feature_edges)] * table["scale"]
    return table["scores"] <= factor, 2.0 * factor * table["widths"]


def measure(table, factors, width_edges, feature=None, feature_edges=()) -> dict:
    inside, width = covered(table, factors, width_edges, feature, feature_edges)
    return {"brain": round(float(inside.mean()), 4), "lesions": round(float(inside[table["lesion"]].mean()), 4),
            "mean_width_pp": round(float(width.mean()), 2)}


def main() -> int:
    from interval_lesions import DEV_SEED
    from OEFPredictorLib import models
    from OEFPredictorLib.training import calibration
    from OEFPredictorLib.training.context import ContextTrainConfig

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a context model (default: the bundled one)")
    parser.add_argument("--patients", type=int, default=24, help="calibration patients")
    parser.add_argument("--dev-patients", type=int, default=12)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "interval_features.json"))
    args = parser.parse_args()
    bundle = models.load_bundle(args.model)
    config = ContextTrainConfig(voxel_size_mm=float(bundle.card["spatial"]["voxel_size_mm"]))

    def volumes(patients: int, seed: int, wide: bool) -> list[dict]:
        sized = dataclasses.replace(config, calibration_patients=patients)
        return list(calibration.shipped_volumes(bundle, sized, seed, wide=wide, features=features,
                                                progress=lambda i, n, what: print(f"{seed}: {i}/{n}", flush=True)))

    fit_set = volumes(args.patients, calibration.CALIBRATION_SEED, False)
    dev_set = volumes(args.dev_patients, DEV_SEED, True)
    scale_fit, _ = calibration.volume_scale_fit([v["noise_level"] for v in fit_set], [v["resampling"] for v in fit_set],
                                                [v["scores"] for v in fit_set])
    fit_table, dev_table = pooled(fit_set, scale_fit), pooled(dev_set, scale_fit)
    width_edges = np.quantile(fit_table["widths"], np.linspace(0, 1, calibration.WIDTH_BINS + 1)[1:-1])
    card_like = fit(fit_table, width_edges)
    result = {"model": bundle.path.name,
              "calibration": {"seed": calibration.CALIBRATION_SEED, "patients": args.patients, "priors": "population"},
              "development": {"seed": DEV_SEED, "patients": args.dev_patients, "priors": "wide"},
              "card_like": {"calibration": measure(fit_table, card_like, width_edges),
                            "development": measure(dev_table, card_like, width_edges)},
              "features": {}}
    dev_inside, _ = covered(dev_table, card_like, width_edges)
    for feature in FEATURES:
        edges = np.quantile(fit_table[feature], FEATURE_QUANTILES)
        bin_of = np.searchsorted(edges, dev_table[feature])
        lesions = dev_table["lesion"]
        bounds = [0.0, *FEATURE_QUANTILES, 1.0]
        per_bin = [{"quantiles": bounds[b:b + 2],
                    "lesion_share": round(float(lesions[bin_of == b].mean()), 4),
                    "share_of_lesion_voxels": round(float(lesions[bin_of == b].sum() / max(lesions.sum(), 1)), 3),
                    "coverage": round(float(dev_inside[bin_of == b].mean()), 3),
                    "lesion_coverage": (round(float(dev_inside[(bin_of == b) & lesions].mean()), 3)
                                        if np.any((bin_of == b) & lesions) else None)}
                   for b in range(len(edges) + 1)]
        factors = fit(fit_table, width_edges, feature, edges)
        result["features"][feature] = {"edges": [round(float(e), 5) for e in edges], "development_bins": per_bin,
                                       "calibration": measure(fit_table, factors, width_edges, feature, edges),
                                       "development": measure(dev_table, factors, width_edges, feature, edges)}
        print(feature, json.dumps(result["features"][feature]), flush=True)
    print("card-like", json.dumps(result["card_like"]))
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
