"""Echo trains resampled to the model's echo times, under noise: the same patients, the same noise level, at
the model's own protocol and at other echo trains (sparse and dense), paired, so that what differs is the
resampling alone.

    .venv/bin/python benchmarks/sparse_trains.py [--trains sparse|late|short|gaps] [--model M.keras] [--seed 9871]
                                                 [--patients 4]

Four sets of echo trains (--trains):
- sparse (default): trains that cover the paper-protocol network's span, sparse and dense;
- late: trains whose first echo comes after the network's (4.5 ms, 3 T-equivalent), continued back to it;
- short: trains that stop short of 22 ms (3 T and 1.5 T), read by the 4.5-22 ms network (the default --model for
  this set), beside trains that cover its span;
- gaps: trains whose echoes lie too far apart for the paper-protocol network (with the ms continued), which the
  engine gives the 4.5-22 ms network (the default --model for this set).

Why: on calibration patients, trains whose echoes lie far apart (more than 5.5 ms, 3 T-equivalent) were
mapped several points too high over the whole brain, while noise-free they gave the own protocol's map. The
resampled echoes are unbiased, but their noise is a few smooth curves (a fit through 6-8 samples read at 8
times): strongly correlated from echo to echo and smaller than the own protocol's white noise. A network
trained only on white noise can read such noise as a decay shape.

Patients (training.data.make_patient): a development seed (default 9871; never a training, validation,
calibration or test seed), population tissue priors, stroke-like lesions (some lesion-free), 2 mm. Each is
seen at every protocol of the set at SNR 40 and 100 (QSM noise 2 ppb, the receive-field bias of training
noise, R2 grown with the field as B0^0.5), through the engine's own path (spatial.predict_volume, with the
card's interval). Per protocol and SNR: OEF bias and RMSE over the brain without CSF, the interval's coverage
and mean width, the noise level the engine measured, and the noise of the echo ratios the network reads (their
SD and the correlation of neighbouring echoes; resampled trains against the same patient resampled without
noise; first patient). Writes benchmarks/results/sparse_trains.json (or --out).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "OEFPredictor"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

DEV_SEED = 9871
SNRS = (40.0, 100.0)
R2_FIELD_EXPONENT = 0.5
# (name, echo times ms, field T); each set starts with a train its network reads without continuing the decay
OWN = ("own: 8 echoes 4.5/5 ms, 3 T", [4.5 + 5.0 * i for i in range(8)], 3.0)
COVERS_SHORT = ("8 echoes 3/3 ms, 3 T (to 24 ms: covers)", [3.0 + 3.0 * i for i in range(8)], 3.0)  # 4.5-22 ms
TRAINS = {
    "sparse": [
        OWN,
        ("6 echoes 4/7 ms, 3 T (7 ms apart)", [4.0 + 7.0 * i for i in range(6)], 3.0),
        ("6 echoes 3.5/6.5 ms, 3.6 T (7.8 ms apart, 3 T-eq.)", [3.5 + 6.55 * i for i in range(6)], 3.6),
        ("7 echoes 3/6.2 ms, 3 T", [3.0 + 6.2 * i for i in range(7)], 3.0),
        ("12 echoes 3.5/4.1 ms, 3 T", [3.5 + 4.1 * i for i in range(12)], 3.0),
        ("7 T, 12 echoes 1.8/1.6 ms", [1.8 + 1.6 * i for i in range(12)], 7.0),
    ],
    "late": [
        OWN,
        ("8 echoes 5.5/5 ms, 3 T (1 ms late)", [5.5 + 5.0 * i for i in range(8)], 3.0),
        ("8 echoes 6/5 ms, 3 T (1.5 ms late)", [6.0 + 5.0 * i for i in range(8)], 3.0),
        ("8 echoes 7/5 ms, 3 T (2.5 ms late)", [7.0 + 5.0 * i for i in range(8)], 3.0),
        ("8 echoes 8/4.5 ms, 3 T (3.5 ms late)", [8.0 + 4.5 * i for i in range(8)], 3.0),
        ("7 T, 10 echoes 2.5/2.1 ms (1.33 ms late, 3 T-eq.)", [2.5 + 2.1 * i for i in range(10)], 7.0),
    ],
    "short": [
        COVERS_SHORT,
        ("7 echoes 3/3 ms, 3 T (to 21 ms)", [3.0 + 3.0 * i for i in range(7)], 3.0),
        ("6 echoes 3/3 ms, 3 T (to 18 ms)", [3.0 + 3.0 * i for i in range(6)], 3.0),
        ("5 echoes 3/3 ms, 3 T (to 15 ms)", [3.0 + 3.0 * i for i in range(5)], 3.0),
        ("1.5 T, 8 echoes 5/7 ms (to 27 ms, 3 T-eq.: covers)", [5.0 + 7.0 * i for i in range(8)], 1.5),
        ("1.5 T, 9 echoes 5/5 ms (to 22.5 ms, 3 T-eq.: covers)", [5.0 + 5.0 * i for i in range(9)], 1.5),
        ("1.5 T, 8 echoes 5/5 ms (to 20 ms, 3 T-eq.)", [5.0 + 5.0 * i for i in range(8)], 1.5),
        ("1.5 T, 10 echoes 3/3 ms (to 15 ms, 3 T-eq.)", [3.0 + 3.0 * i for i in range(10)], 1.5),
    ],
    # too sparse for the paper-protocol network (its card's max_gap_ms: the widest gap plus the ms continued), so
    # the engine gives them the 4.5-22 ms network
    "gaps": [
        COVERS_SHORT,
        ("6 echoes 7/7 ms, 3 T (2.5 ms late, 7 ms apart)", [7.0 + 7.0 * i for i in range(6)], 3.0),
        ("7 T, 10 echoes 3/3 ms (2.5 ms late, 7 ms apart)", [3.0 + 3.0 * i for i in range(10)], 7.0),
        ("4.29 T, 6 echoes 4.6/5.45 ms (2.1 ms late, 7.8 ms apart)", [4.6 + 5.45 * i for i in range(6)], 4.29),
        ("7 T, 8 echoes 2/4 ms (9.3 ms apart)", [2.0 + 4.0 * i for i in range(8)], 7.0),
        ("7 T, 6 echoes 1.8/6 ms (14 ms apart)", [1.8 + 6.0 * i for i in range(6)], 7.0),
    ],
}
SHORT_SPAN_MODEL = "oef_context_short.keras"  # the default --model of the "short" and "gaps" sets


def read_noise(patient, protocol, own, noisy_echoes, noise_free_echoes) -> dict:
    """SD per echo ratio and mean neighbour correlation of the noise of the echoes the network reads (log echo
    ratios, noisy minus noise-free; resampled to the model's echo times unless the protocol is its own)."""
    from OEFPredictorLib import decay

    def log_ratios(echoes):
        out = echoes if protocol.matches(own) else decay.resample_echoes(echoes, patient.mask, protocol, own)
        out = out[patient.metric]
        out = np.log(np.maximum(out, 1e-9))
        return out[:, 1:] - out[:, :1]

    noise = log_ratios(noisy_echoes) - log_ratios(noise_free_echoes)
    corr = np.corrcoef(noise.T)
    return {"noise_sd": [round(float(s), 4) for s in noise.std(axis=0)],
            "neighbour_correlation": round(float(np.mean([corr[k, k + 1] for k in range(len(corr) - 1)])), 3)}


def main() -> int:
    from OEFPredictorLib import evaluate, models, physics, resources, spatial
    from OEFPredictorLib.training.context import ContextTrainConfig
    from OEFPredictorLib.training.data import make_patient, signals
    from OEFPredictorLib.training.noise import add_noise

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trains", choices=sorted(TRAINS), default="sparse", help="which echo trains (default sparse)")
    parser.add_argument("--model", default=None, help="a context model (default: the bundled one, or the 4.5-22 ms "
                                                      "one for --trains short and gaps)")
    parser.add_argument("--seed", type=int, default=DEV_SEED)
    parser.add_argument("--patients", type=int, default=4)
    parser.add_argument("--out", default=None, help="default: benchmarks/results/sparse_trains.json, or "
                                                    "sparse_trains_<set>.json for another set")
    args = parser.parse_args()
    protocols = TRAINS[args.trains]
    out_path = Path(args.out or REPO / "benchmarks" / "results" /
                    ("sparse_trains.json" if args.trains == "sparse" else f"sparse_trains_{args.trains}.json"))
    if args.model is None and args.trains in ("short", "gaps"):
        args.model = str(resources.resource_path("Models", SHORT_SPAN_MODEL))
    bundle = models.load_bundle(args.model)
    constant = 100.0 * physics.oef_from_Y(evaluate.healthy_prior_Y())
    spacing = (float(bundle.card["spatial"]["voxel_size_mm"]),) * 3
    config = ContextTrainConfig(voxel_size_mm=spacing[0])
    own = bundle.protocol
    started = time.perf_counter()
    rows = {(name, snr): [] for name, _, _ in protocols for snr in SNRS}
    constant_rmse = []  # the constant guess (evaluate's "constant": the healthy brain's prior OEF), per patient
    for i in range(args.patients):
        patient = make_patient(args.seed, i, config, wide=False)
        truth = 100.0 * physics.oef_from_Y(patient.params[..., 2][patient.mask].astype(np.float64))
        keep = patient.metric[patient.mask]
        constant_rmse.append(float(np.sqrt(np.mean((truth[keep] - constant) ** 2))))
        for s, snr in enumerate(SNRS):
            for k, (name, te_ms, field) in enumerate(protocols):
                protocol = physics.Protocol.from_milliseconds(te_ms, field)
                clean, qsm, _ = signals(patient, protocol, R2_FIELD_EXPONENT)
                rng = np.random.default_rng([args.seed, i, s, k])
                echoes, noisy_qsm, _ = add_noise(clean, qsm, rng, config, snr, 2.0)
                noisy_qsm = np.where(patient.mask, noisy_qsm, 0.0)
                diagnostics = {}
                out = spatial.predict_volume(bundle, echoes, noisy_qsm, patient.mask, spacing, protocol,
                                             diagnostics=diagnostics)
                error = out["OEF"][keep] - truth[keep]
                inside = (out["OEF_p05"][keep] <= truth[keep]) & (truth[keep] <= out["OEF_p95"][keep])
                row = {"patient": i, "bias_pp": float(error.mean()), "rmse_pp": float(np.sqrt(np.mean(error ** 2))),
                       "coverage": float(inside.mean()),
                       "width_pp": float(np.mean(out["OEF_p95"][keep] - out["OEF_p05"][keep])),
                       "noise_level": float(diagnostics["noise_level"])}
                if i == 0:  # the noise of the echoes the network reads, on one patient
                    row.update(read_noise(patient, protocol, own, echoes, clean))
                rows[(name, snr)].append(row)
                print(f"patient {i} SNR {snr:g} {name}: bias {row['bias_pp']:+.2f} rmse {row['rmse_pp']:.2f} "
                      f"coverage {row['coverage']:.2f}", flush=True)
    summary = []
    for (name, snr), per_patient in rows.items():
        entry = {"protocol": name, "snr": snr,
                 **{key: round(float(np.mean([r[key] for r in per_patient])), 3)
                    for key in ("bias_pp", "rmse_pp", "coverage", "width_pp", "noise_level")},
                 "bias_per_patient_pp": [round(r["bias_pp"], 2) for r in per_patient]}
        first = per_patient[0]
        entry.update({key: first[key] for key in ("noise_sd", "neighbour_correlation")})
        summary.append(entry)
    result = {"model": bundle.path.name, "trains": args.trains, "seed": args.seed, "patients": args.patients,
              "snrs": list(SNRS), "constant_rmse_pp": round(float(np.mean(constant_rmse)), 3),
              "qsm_noise_ppb": 2.0, "r2_field_exponent": R2_FIELD_EXPONENT, "voxel_size_mm": spacing[0],
              "seconds": round(time.perf_counter() - started, 1), "rows": summary}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"constant guess: rmse {result['constant_rmse_pp']:.2f}")
    for entry in summary:
        print(f"{entry['protocol']:52s} SNR {entry['snr']:>5g}: bias {entry['bias_pp']:+.2f} rmse {entry['rmse_pp']:.2f} "
              f"cov {entry['coverage']:.2f} width {entry['width_pp']:.1f} noise corr {entry['neighbour_correlation']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
