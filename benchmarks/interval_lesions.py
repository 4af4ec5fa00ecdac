"""Can the 90 % OEF interval hold 70 % of lesion voxels while it holds 88-92 % of the brain? Three ways of
calibrating the default model's interval, fitted on its calibration patients and measured on development
patients with other (wide) tissue priors:

    .venv/bin/python benchmarks/interval_lesions.py [--model M.keras] [--patients 24] [--dev-patients 12]

On the map after the card's contrast gain (spatial.contrast_gain), as the engine makes it.
- "bundled": the card's way (calibration.recalibrate): a per-volume scale fitted to the noise level and
  resampling, then one symmetric factor per bin of half-width x predicted abnormality (|OEF - median|);
- "lesion-enriched bins": the same scale; finer abnormality bins; the outward side (away from the brain's
  median) and the inward side calibrated apart (95 % each), and the outward side widened until it holds
  75 % of the calibration lesion voxels, in the abnormality bins where lesions are at least 2 % of the voxels;
- "every abnormality bin": the same, widened in every abnormality bin that holds 100 lesion voxels.
Patients (training/calibration.calibration_volumes): the calibration seed (303, population priors) and a
development seed (9801, wide priors), each at a drawn protocol the model reads, with noise, bias and QSM
offset drawn as in training. Not test data: no test seed is used. Writes benchmarks/results/interval_lesions.json,
with each volume's acquisition and OEF bias.
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

DEV_SEED = 9801
LESION_TARGET = 0.75  # of lesion voxels, per abnormality bin: 70 % with a margin for new patients
ENRICHED = 0.02  # a bin is lesion-enriched where lesions make this share of its voxels (~4x the base rate)
MIN_LESION_VOXELS = 100
FINE_ABNORMALITY_EDGES_PP = (2.0, 4.0, 6.0, 8.0, 10.0, 15.0)


def pooled(volumes: list[dict], scale_fit) -> dict:
    """The volumes' voxels in one table, with each voxel's volume scale (spatial.noise_scale)."""
    from OEFPredictorLib import spatial

    table = {k: np.concatenate([v[k] for v in volumes]) for k in ("oef", "truth", "below", "above", "widths",
                                                                  "scores", "abnormal", "lesion")}
    table["scale"] = np.concatenate([np.full(len(v["oef"]), spatial.noise_scale({"noise": scale_fit}, v["noise_level"],
                                                                                v["resampling"]))
                                     for v in volumes])
    table["outward"] = np.where(table["oef"] >= np.concatenate([np.full(len(v["oef"]), np.median(v["oef"]))
                                                                for v in volumes]), 1.0, -1.0)
    return table


def bins(table: dict, width_edges, abnormality_edges):
    return np.searchsorted(abnormality_edges, table["abnormal"]), np.searchsorted(width_edges, table["widths"])


def sided_scores(table: dict):
    """Per voxel, the factors on its outward and inward half-widths (over its volume scale) that just cover
    the truth (0 on the side the truth is not on)."""
    half_out = np.where(table["outward"] > 0, table["above"], table["below"])
    half_in = np.where(table["outward"] > 0, table["below"], table["above"])
    excess = (table["truth"] - table["oef"]) * table["outward"]
    return (np.maximum(excess, 0) / half_out / table["scale"], np.maximum(-excess, 0) / half_in / table["scale"])


def fit(table: dict, width_edges, abnormality_edges, lesion_bins: str | None) -> np.ndarray:
    """(abnormality bins, width bins, 2) factors: outward and inward; symmetric ones for lesion_bins=None."""
    from OEFPredictorLib.training.calibration import MIN_BIN_VOXELS, conformal_factor

    a_bin, w_bin = bins(table, width_edges, abnormality_edges)
    out_scores, in_scores = sided_scores(table)
    symmetric = table["scores"] / table["scale"]  # calibration.interval_scores: the larger of the two sides
    factors = np.zeros((len(abnormality_edges) + 1, len(width_edges) + 1, 2))
    for a in range(factors.shape[0]):
        in_a = a_bin == a
        lesions = in_a & table["lesion"]
        widen = lesion_bins is not None and lesions.sum() >= MIN_LESION_VOXELS and (
            lesion_bins == "every" or lesions.sum() >= ENRICHED * in_a.sum())
        for w in range(factors.shape[1]):
            inside = in_a & (w_bin == w)
            inside = inside if inside.sum() >= MIN_BIN_VOXELS else np.ones_like(inside)
            if lesion_bins is None:
                factors[a, w] = conformal_factor(symmetric[inside], 0.90)
                continue
            factors[a, w] = conformal_factor(out_scores[inside], 0.95), conformal_factor(in_scores[inside], 0.95)
            if widen:
                factors[a, w, 0] = max(factors[a, w, 0], conformal_factor(out_scores[lesions], LESION_TARGET))
    return factors


def measure(volumes: list[dict], scale_fit, width_edges, abnormality_edges, factors) -> dict:
    per_volume, lesion_hits, widths = [], [], []
    for v in volumes:
        table = pooled([v], scale_fit)
        a_bin, w_bin = bins(table, width_edges, abnormality_edges)
        f_out, f_in = (factors[a_bin, w_bin, k] * table["scale"] for k in (0, 1))
        up = table["outward"] > 0
        hi = table["oef"] + table["above"] * np.where(up, f_out, f_in)
        lo = table["oef"] - table["below"] * np.where(up, f_in, f_out)
        inside = (table["truth"] >= lo) & (table["truth"] <= hi)
        per_volume.append(float(inside.mean()))
        lesion_hits.append(inside[table["lesion"]])
        widths.append(hi - lo)
    lesion_hits, widths = np.concatenate(lesion_hits), np.concatenate(widths)
    n_brain = sum(len(v["oef"]) for v in volumes)
    return {"brain": round(sum(c * len(v["oef"]) for c, v in zip(per_volume, volumes)) / n_brain, 4),
            "worst_volume": round(min(per_volume), 4), "best_volume": round(max(per_volume), 4),
            "lesions": round(float(lesion_hits.mean()), 4) if len(lesion_hits) else None,
            "lesion_voxels": int(len(lesion_hits)), "mean_width_pp": round(float(widths.mean()), 2)}


def main() -> int:
    from OEFPredictorLib import models
    from OEFPredictorLib.training import calibration
    from OEFPredictorLib.training.context import ContextTrainConfig

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a context model (default: the bundled one)")
    parser.add_argument("--patients", type=int, default=ContextTrainConfig.calibration_patients)
    parser.add_argument("--dev-patients", type=int, default=12)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "interval_lesions.json"))
    args = parser.parse_args()
    bundle = models.load_bundle(args.model)
    config = ContextTrainConfig(voxel_size_mm=float(bundle.card["spatial"]["voxel_size_mm"]))

    def progress(i, n, what):
        print(f"{what}: {i}/{n}", flush=True)

    def volumes(patients: int, seed: int, wide: bool) -> list[dict]:
        sized = dataclasses.replace(config, calibration_patients=patients)
        return list(calibration.shipped_volumes(bundle, sized, seed, wide=wide, progress=progress))

    fit_set = volumes(args.patients, calibration.CALIBRATION_SEED, False)
    dev_set = volumes(args.dev_patients, DEV_SEED, True)
    scale_fit, _ = calibration.volume_scale_fit([v["noise_level"] for v in fit_set],
                                                [v["resampling"] for v in fit_set], [v["scores"] for v in fit_set])
    table = pooled(fit_set, scale_fit)
    width_edges = np.quantile(table["widths"], np.linspace(0, 1, calibration.WIDTH_BINS + 1)[1:-1])
    result = {"model": bundle.path.name,
              "calibration": {"seed": calibration.CALIBRATION_SEED, "patients": args.patients, "priors": "population"},
              "development": {"seed": DEV_SEED, "patients": args.dev_patients, "priors": "wide"},
              "lesion_target": LESION_TARGET, "enriched_share": ENRICHED, "schemes": {}}
    for name, edges, lesion_bins in (("bundled", calibration.ABNORMALITY_EDGES_PP, None),
                                     ("lesion-enriched bins", FINE_ABNORMALITY_EDGES_PP, "enriched"),
                                     ("every abnormality bin", FINE_ABNORMALITY_EDGES_PP, "every")):
        factors = fit(table, width_edges, edges, lesion_bins)
        result["schemes"][name] = {"abnormality_edges_pp": list(edges),
                                   "calibration": measure(fit_set, scale_fit, width_edges, edges, factors),
                                   "development": measure(dev_set, scale_fit, width_edges, edges, factors)}
        print(name, json.dumps(result["schemes"][name]), flush=True)
    # where whole volumes go wrong: each volume's OEF bias (pp) and its acquisition
    result["volumes"] = [{"set": which, "protocol": v["protocol"], "noise_level": round(float(v["noise_level"]), 3),
                          "resampled": v["resampling"].resampled, "bias_pp": round(float(np.mean(v["oef"] - v["truth"])), 2),
                          "rmse_pp": round(float(np.sqrt(np.mean((v["oef"] - v["truth"]) ** 2))), 2)}
                         for which, volumes in (("calibration", fit_set), ("development", dev_set)) for v in volumes]
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
