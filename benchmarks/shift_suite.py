"""The shift suite: the default model on data unlike its training data, beside the paper's LSTM, a
constant guess and CAT.

    .venv/bin/python benchmarks/shift_suite.py --seed 9401 [--patients 3] [--out benchmarks/results/shift_suite.json]

Every condition simulates its own stroke-like patients (2 mm, QSM noise 2 ppb; fresh seeds: --seed plus
the condition's number, never used for training, validation or calibration, which use 101, 202, 303)
and changes one thing from the paper's 3 T protocol at SNR 100:
- echo protocols: specific echo trains (the training draws random ones; none is the paper's);
- field strength: 1.5 T and 7 T, with R2 kept at its 3 T value or grown as B0^0.75;
- QSM reference: a constant offset of +-0.05 ppm added to the QSM inside the brain (the default model
  also runs on the same patients before the offset, so its own effect is read pairwise);
- SNR 30, 40, 100 and 200;
- other tissue priors (less deoxygenated, less blood, higher R2, as other simulators use) with large
  blob lesions only;
- lesion-free brains at SNR 40 and 100, for the invented-lesion volume;
- 7 T and 2.89 T echo trains that cover the default model's span, and several shifts at once;
- 3 T trains whose first echo is late (6 and 8 ms), lesion-free 1.5 T brains at SNR 40 and a 1.5 T QSM offset (the
  4.5-22 ms network), and trains that end before 22 ms in 3 T-equivalent time (3 T, and 1.5 T to 42.5 ms).
Metrics (evaluate.py): OEF RMSE over the brain without CSF, the lesion contrast recovered (lesion vs its
contralateral mirror), the 90 % interval's coverage over the brain and inside lesions, and its width;
the LSTM runs only where the protocol is its own (it refuses the others), on --lstm-voxels voxels per patient
plus every lesion voxel, and CAT on --cat-voxels.
Writes the JSON and a Markdown table beside it.
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

PAPER = ([4.5 + 5.0 * i for i in range(8)], 3.0)
# Tissue priors unlike the training ones (nearer QQ-NET's training statistics: Y ~0.68, v ~1.8 %).
OTHER_PRIORS_SHIFT = {"Y": 0.08, "v": 0.65, "R2": 3.0, "chi_nb": 0.02}


def other_priors():
    from OEFPredictorLib import phantom

    out = {}
    for tissue, prior in phantom.TISSUE_PRIORS.items():
        if tissue == "CSF":
            out[tissue] = prior
            continue
        (y, y_sd, y_lo, y_hi), (v, v_sd, v_lo, v_hi) = prior["Y"], prior["v"]
        (r2, r2_sd, r2_lo, r2_hi), (chi, chi_sd, chi_lo, chi_hi) = prior["R2"], prior["chi_nb"]
        s = OTHER_PRIORS_SHIFT
        out[tissue] = {"Y": (y + s["Y"], y_sd, y_lo + s["Y"], min(0.95, y_hi + s["Y"])),
                       "v": (v * s["v"], v_sd * s["v"], v_lo * s["v"], v_hi * s["v"]),
                       "R2": (r2 + s["R2"], r2_sd, r2_lo + s["R2"], r2_hi + s["R2"]),
                       "chi_nb": (chi + s["chi_nb"], chi_sd, chi_lo + s["chi_nb"], chi_hi + s["chi_nb"]),
                       "S0": prior["S0"]}
    return out


def conditions():
    """(name, group, protocol (ms, T), SNR, QSM offset ppm, R2 field exponent, patient overrides, lesions)."""
    other = {"tissue_priors": other_priors(), "lesion_shapes": ("blob",), "lesion_size_mm": (20.0, 40.0)}
    rows = [
        ("3 T paper protocol (8 echoes 4.5/5 ms)", "protocol", PAPER, 100, 0.0, 0.0, None, True),
        ("3 T, 7 echoes from 3 ms, 6.2 ms apart", "protocol", ([3.0 + 6.2 * i for i in range(7)], 3.0), 100, 0.0, 0.0, None, True),
        ("3 T, 6 echoes 2.2/3.1 ms (last 17.7 ms)", "protocol", ([2.2 + 3.1 * i for i in range(6)], 3.0), 100, 0.0, 0.0, None, True),
        ("3 T, 12 echoes 3.5/4.1 ms (last 48.6 ms)", "protocol", ([3.5 + 4.1 * i for i in range(12)], 3.0), 100, 0.0, 0.0, None, True),
        ("3 T, 10 echoes, uneven spacing", "protocol", ([2.8, 5.1, 8.9, 12.2, 17.0, 21.1, 26.9, 31.0, 37.2, 42.5], 3.0), 100, 0.0, 0.0, None, True),
        ("1.5 T, 8 echoes 5/7 ms, R2 as at 3 T", "field", ([5.0 + 7.0 * i for i in range(8)], 1.5), 100, 0.0, 0.0, None, True),
        ("1.5 T, 8 echoes 5/7 ms, R2 x (B0/3)^0.75", "field", ([5.0 + 7.0 * i for i in range(8)], 1.5), 100, 0.0, 0.75, None, True),
        ("7 T, 10 echoes 2.5/2.1 ms, R2 as at 3 T", "field", ([2.5 + 2.1 * i for i in range(10)], 7.0), 100, 0.0, 0.0, None, True),
        ("7 T, 10 echoes 2.5/2.1 ms, R2 x (B0/3)^0.75", "field", ([2.5 + 2.1 * i for i in range(10)], 7.0), 100, 0.0, 0.75, None, True),
        ("QSM offset +0.05 ppm", "qsm", PAPER, 100, 0.05, 0.0, None, True),
        ("QSM offset -0.05 ppm", "qsm", PAPER, 100, -0.05, 0.0, None, True),
        ("SNR 30", "snr", PAPER, 30, 0.0, 0.0, None, True),
        ("SNR 40", "snr", PAPER, 40, 0.0, 0.0, None, True),
        ("SNR 200", "snr", PAPER, 200, 0.0, 0.0, None, True),
        ("other tissue priors, large blob lesions", "priors", PAPER, 100, 0.0, 0.0, other, True),
        ("lesion-free, SNR 40", "specificity", PAPER, 40, 0.0, 0.0, None, False),
        ("lesion-free, SNR 100", "specificity", PAPER, 100, 0.0, 0.0, None, False),
        # added later (the rows above keep their seeds): 7 T echoes that cover the model's span, a Siemens
        # "3 T" (2.89 T) train, and several shifts at once
        ("7 T, 12 echoes 1.8/1.6 ms, R2 as at 3 T", "field", ([1.8 + 1.6 * i for i in range(12)], 7.0), 100, 0.0, 0.0, None, True),
        ("7 T, 12 echoes 1.8/1.6 ms, R2 x (B0/3)^0.75", "field", ([1.8 + 1.6 * i for i in range(12)], 7.0), 100, 0.0, 0.75, None, True),
        ("2.89 T, 16 echoes 2.0/2.6 ms", "field", ([2.0 + 2.6 * i for i in range(16)], 2.89), 100, 0.0, 0.0, None, True),
        ("all at once: 12 echoes 3.5/4.1 ms, SNR 40, QSM +0.03 ppm, other priors", "combined",
         ([3.5 + 4.1 * i for i in range(12)], 3.0), 40, 0.03, 0.0, other, True),
        ("lesion-free, 12 echoes 3.5/4.1 ms, SNR 40", "specificity", ([3.5 + 4.1 * i for i in range(12)], 3.0), 40, 0.0, 0.0,
         None, False),
        # added with the networks bound to shorter spans: a 3 T train whose first echo is late, and the 4.5-22 ms
        # network's specificity at low SNR
        ("3 T, 8 echoes 6/5 ms (first echo late)", "protocol", ([6.0 + 5.0 * i for i in range(8)], 3.0), 100, 0.0, 0.0,
         None, True),
        ("lesion-free, 1.5 T, 8 echoes 5/7 ms, SNR 40", "specificity", ([5.0 + 7.0 * i for i in range(8)], 1.5), 40, 0.0,
         0.75, None, False),
        # added when the 4.5-22 ms network's card was found not to say that it reads QSM relative to CSF
        ("1.5 T, 8 echoes 5/7 ms, QSM offset +0.05 ppm", "qsm", ([5.0 + 7.0 * i for i in range(8)], 1.5), 100, 0.05,
         0.75, None, True),
        # added when the decay began to be continued beyond the echoes (a first echo up to 4 ms late, 3 T-equivalent;
        # the 4.5-22 ms network's last echo up to 4 ms early): the latest supported 3 T first echo, and trains that
        # end before 22 ms (3 T-equivalent)
        ("3 T, 8 echoes 8/4.5 ms (first echo 8 ms)", "protocol", ([8.0 + 4.5 * i for i in range(8)], 3.0), 100, 0.0, 0.0,
         None, True),
        ("3 T, 7 echoes 2.5/3 ms (last 20.5 ms)", "protocol", ([2.5 + 3.0 * i for i in range(7)], 3.0), 100, 0.0, 0.0,
         None, True),
        ("1.5 T, 8 echoes 4/5.5 ms (last 42.5 ms), R2 x (B0/3)^0.75", "field", ([4.0 + 5.5 * i for i in range(8)], 1.5),
         100, 0.0, 0.75, None, True),
    ]
    return rows


def add_qsm_offset(folder: Path, offset: float) -> None:
    """A pipeline with another QSM reference: + offset inside the brain mask (files this script wrote)."""
    import SimpleITK as sitk

    from OEFPredictorLib import simulate

    files = simulate.patient_files(folder)
    image = sitk.ReadImage(str(files["qsm"]))
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(files["mask"]))) > 0
    qsm = sitk.GetArrayFromImage(image)
    qsm[mask] += np.float32(offset)
    out = sitk.GetImageFromArray(qsm)
    out.CopyInformation(image)
    sitk.WriteImage(out, str(files["qsm"]))


def run_condition(k, row, args, base: Path) -> dict:
    from OEFPredictorLib import evaluate, physics, predict, simulate
    from OEFPredictorLib.errors import InputError

    name, group, (te_ms, b0), snr, offset, exponent, overrides, lesions = row
    protocol = physics.Protocol.from_milliseconds(te_ms, b0)
    data = base / f"c{k:02d}"
    pids = simulate.simulate_dataset(data, args.patients, seed=args.seed + k, protocol=protocol,
                                     noise=simulate.NoiseModel(float(snr), 2.0), voxel_size=2.0, lesions=lesions,
                                     cohort="stroke", overwrite=True, r2_field_exponent=exponent,
                                     patient_overrides=overrides)
    patients = [p.name for p in pids]
    without_offset = None
    if offset:
        if "context" in args.methods:  # the same patients before the offset: the offset's own effect, paired
            context = evaluate.MethodContext(data, models={"context": args.model})
            without_offset = evaluate.evaluate(data, ["context"], context, patients=patients).summary()[0]["rmse_OEF"]
        for folder in pids:
            add_qsm_offset(folder, offset)
    # whole brains for the fast methods; the LSTM (minutes per brain on 2 cores) and CAT on a subsample
    methods = [(m, v) for m, v in (("context", None), ("constant", None), ("lstm", args.lstm_voxels))
               if m in args.methods]
    result = {"condition": name, "group": group, "protocol": protocol.describe(), "snr": snr, "qsm_offset_ppm": offset,
              "r2_field_exponent": exponent, "seed": args.seed + k, "patients": len(patients), "methods": {}}
    if "context" in args.methods:  # which bundled context model reads this protocol (or the one given)
        try:
            result["context_model"] = predict.Predictor.build(protocol, "context", args.model).bundle.path.name
        except InputError:
            pass
    context = evaluate.MethodContext(data, models={"context": args.model})
    runs = methods + ([("cat", args.cat_voxels)] if "cat" in args.methods and args.cat_voxels and lesions else [])
    for method, max_voxels in runs:
        try:
            ev = evaluate.evaluate(data, [method], context, patients=patients, max_voxels_per_patient=max_voxels)
        except InputError as exc:  # a model bound to another protocol says so
            result["methods"][method] = {"refused": str(exc)}
            continue
        result["methods"][method] = {key: v for key, v in ev.summary()[0].items() if key != "method"}
        for s in ev.lesion_summary():
            result["methods"][method][f"recovered_{s['lesion']}"] = s["recovered"]
    if without_offset is not None and "rmse_OEF" in result["methods"].get("context", {}):
        result["methods"]["context"]["rmse_OEF_without_offset"] = without_offset
    return result


def markdown(results: list[dict], lstm_results: list[dict] | None = None) -> str:
    """The table; `lstm_results`: the LSTM's rows of a separate run (it is slow), matched by condition."""
    from OEFPredictorLib import methods

    lstm = {r["condition"]: r["methods"]["lstm"] for r in lstm_results or [] if "lstm" in r["methods"]}
    preferred = methods.get("context").model_file

    def pct(x):
        return "-" if x is None or not np.isfinite(x) else f"{100 * x:.0f} %"

    def num(x, digits=2):
        return "-" if x is None or not np.isfinite(x) else f"{x:.{digits}f}"

    lines = ["| condition | context RMSE (pp) | penumbra / core recovered | coverage brain / lesions | width (pp) "
             "| invented lesions | LSTM RMSE | constant RMSE | CAT RMSE |", "|---|---|---|---|---|---|---|---|---|"]
    def rmse(m, method):
        if method not in m:
            return "-"
        return num(m[method]["rmse_OEF"]) if "rmse_OEF" in m[method] else "refused"

    for r in results:
        m = r["methods"] if r["condition"] not in lstm else dict(r["methods"], lstm=lstm[r["condition"]])
        c = m.get("context", {"refused": "not run"})
        if "refused" in c:
            said = "not run" if "context" not in m else "refused"
            lines.append(f"| {r['condition']} | {said} | | | | | {rmse(m, 'lstm')} | {rmse(m, 'constant')} | {rmse(m, 'cat')} |")
            continue
        paired = (f" ({num(c['rmse_OEF_without_offset'])} without the offset)" if "rmse_OEF_without_offset" in c
                  else "")
        # a bundled model other than the method's first ran (its echoes do not cover that one's span)
        fallback = f" ({r['context_model']})" if r.get("context_model") not in (None, preferred) else ""
        lines.append(
            f"| {r['condition']}{fallback} | {num(c['rmse_OEF'])}{paired} | {pct(c.get('recovered_misery_perfusion'))} / "
            f"{pct(c.get('recovered_infarct_core'))} | {pct(c.get('coverage_OEF'))} / {pct(c.get('coverage_OEF_lesions'))} "
            f"| {num(c.get('width_OEF'), 1)} | {'%.2f %%' % (100 * c['invented_fraction']) if 'invented_fraction' in c else '-'} "
            f"| {rmse(m, 'lstm')} | {rmse(m, 'constant')} | {rmse(m, 'cat')} |")
    return "\n".join(lines) + "\n"


def ordered(results: list[dict]) -> list[dict]:
    """Rows in the order of conditions()."""
    order = {row[0]: k for k, row in enumerate(conditions())}
    return sorted(results, key=lambda r: order.get(r["condition"], len(order)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, required=True, help="base seed of the test patients (fresh)")
    parser.add_argument("--patients", type=int, default=3, help="patients per condition")
    parser.add_argument("--model", default=None, help="context model file (default: the bundled one)")
    parser.add_argument("--data", default=str(REPO / "data" / "shift_suite"), help="where the patients are written")
    parser.add_argument("--cat-voxels", type=int, default=2000, help="CAT voxels per patient (0: no CAT)")
    parser.add_argument("--lstm-voxels", type=int, default=20000, help="LSTM voxels per patient")
    parser.add_argument("--methods", default="context,constant,lstm,cat", type=lambda t: t.split(","),
                        help="methods to run (default context,constant,lstm,cat)")
    parser.add_argument("--only", default=None, help="comma-separated condition numbers (default: all)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "shift_suite.json"))
    parser.add_argument("--lstm-from", default=None, help="a JSON of this script with the LSTM's rows, for the table")
    parser.add_argument("--update", action="store_true",
                        help="with --only: replace (or add) those conditions' rows in the existing --out JSON, same seed; "
                             "methods not given in --methods keep their earlier results (same patients)")
    args = parser.parse_args(argv)
    lstm_rows = json.loads(Path(args.lstm_from).read_text())["conditions"] if args.lstm_from else None
    rows = list(enumerate(conditions()))
    if args.only:
        keep = {int(k) for k in args.only.split(",")}
        rows = [(k, r) for k, r in rows if k in keep]
    results = []
    started = time.perf_counter()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    kept = []  # --update: the rows of the earlier run that are not run again
    methods_recorded = list(args.methods)
    if args.update:
        earlier = json.loads(out.read_text(encoding="utf-8"))
        if earlier["seed"] != args.seed or earlier["patients_per_condition"] != args.patients:
            parser.error(f"--update: {out} was made with --seed {earlier['seed']} --patients "
                         f"{earlier['patients_per_condition']}; give the same.")
        rerun = {r[0] for _, r in rows}
        kept = [c for c in earlier["conditions"] if c["condition"] not in rerun]
        earlier_methods = {c["condition"]: c["methods"] for c in earlier["conditions"] if c["condition"] in rerun}
        methods_recorded = earlier["methods"] + [m for m in args.methods if m not in earlier["methods"]]
    for k, row in rows:
        t0 = time.perf_counter()
        results.append(run_condition(k, row, args, Path(args.data)))
        if args.update:  # the same patients: the methods not run now keep what they measured
            results[-1]["methods"] = {**earlier_methods.get(row[0], {}), **results[-1]["methods"]}
        c = results[-1]["methods"].get("context", {})
        print(f"[{k:2d}] {row[0]}: context RMSE {c.get('rmse_OEF', float('nan')):.2f} pp, coverage "
              f"{c.get('coverage_OEF', float('nan')):.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
        # written after every condition: a long run interrupted keeps what it measured
        record = {"seed": args.seed, "patients_per_condition": args.patients, "voxel_size_mm": 2.0,
                  "qsm_noise_ppb": 2.0, "model": args.model or "bundled", "methods": methods_recorded,
                  "cat_voxels_per_patient": args.cat_voxels, "lstm_voxels_per_patient": args.lstm_voxels,
                  "seconds": round(time.perf_counter() - started, 1), "conditions": ordered(kept + results)}
        out.write_text(json.dumps(record, indent=1, default=float), encoding="utf-8")
    table = markdown(ordered(kept + results), lstm_rows)
    out.with_suffix(".md").write_text(table, encoding="utf-8")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
