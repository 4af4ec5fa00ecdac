"""How the map's contrast gain (spatial.contrast_gain) was chosen: on development volumes, leave one volume out,
fit the gain on the others (calibration.contrast_gain_fit, with and without the smallest shrink) and measure
the left-out volume's OEF RMSE, by band of SNR, beside the raw network and a constant guess.

    .venv/bin/python benchmarks/contrast_gain.py [--model M.keras] [--volumes 40]

Volumes: training/calibration.calibration_volumes of the development seed 9881 (population priors, a drawn
protocol the model reads, SNR 18-250 log-uniform, noise, bias and QSM offset as in training); raw maps, the
card's own gain is not applied. Also each volume's own best gain (least squares on its departures from the
brain's median), which shows how the best gain falls with the noise. Not test data: no test seed is used.
Writes benchmarks/results/contrast_gain.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "OEFPredictor"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

DEV_SEED = 9881
# Bands of measured noise level (decay.noise_level; about log10(1 / SNR)), named by the SNR they hold.
BANDS = (("SNR < 35", -1.544, np.inf), ("SNR 35-70", -1.845, -1.544), ("SNR 70-130", -2.114, -1.845),
         ("SNR > 130", -np.inf, -2.114))


def rmse(a, b) -> float:
    return float(np.sqrt(np.mean((np.asarray(a, float) - b) ** 2)))


def main() -> int:
    from OEFPredictorLib import evaluate, models, physics
    from OEFPredictorLib.training import calibration
    from OEFPredictorLib.training.context import ContextTrainConfig

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a context model (default: the bundled one)")
    parser.add_argument("--volumes", type=int, default=40)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "contrast_gain.json"))
    args = parser.parse_args()
    bundle = models.load_bundle(args.model)
    config = ContextTrainConfig(calibration_patients=args.volumes,
                                voxel_size_mm=float(bundle.card["spatial"]["voxel_size_mm"]))
    volumes = [v for v in calibration.calibration_volumes(bundle, config, DEV_SEED,
                                                         progress=lambda i, n, what: print(f"{i}/{n}", flush=True))
               if len(v["oef"])]  # as contrast_gain_fit keeps them: its record is per kept volume
    constant = 100.0 * float(physics.oef_from_Y(evaluate.healthy_prior_Y()))
    fit_on_all, record = calibration.contrast_gain_fit(volumes)
    rows = []
    for i, (volume, (level, own_gain)) in enumerate(zip(volumes, record["volumes_noise_level_and_own_gain"])):
        fit, _ = calibration.contrast_gain_fit([v for j, v in enumerate(volumes) if j != i])
        rows.append({"noise_level": level, "own_gain": own_gain,
                     "network": rmse(volume["oef"], volume["truth"]),
                     "gain": rmse(calibration.with_contrast_gain(volume, fit)["oef"], volume["truth"]),
                     "gain_without_smallest_shrink": rmse(
                         calibration.with_contrast_gain(volume, dict(fit, smallest_shrink=0.0))["oef"], volume["truth"]),
                     "constant": rmse(np.full(len(volume["truth"]), constant), volume["truth"])})
    bands = {}
    for name, lo, hi in BANDS:
        inside = [r for r in rows if lo < r["noise_level"] <= hi]
        if inside:
            bands[name] = {"volumes": len(inside), **{key: round(float(np.mean([r[key] for r in inside])), 3)
                                                      for key in ("own_gain", "network", "gain",
                                                                  "gain_without_smallest_shrink", "constant")}}
            print(name, json.dumps(bands[name]), flush=True)
    result = {"model": bundle.path.name, "seed": DEV_SEED, "volumes": len(volumes),
              "note": "mean per-volume OEF RMSE (pp) of the left-out volumes, by band of measured noise",
              "bands": bands, "fit_on_all": fit_on_all, "per_volume": rows}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
