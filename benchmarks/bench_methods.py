"""Time per brain of each OEF method -> benchmarks/results/methods.json.

Each method runs on voxel subsamples of one test patient (two sizes, so a fixed cost such as CAT's
clustering is separated from the per-voxel cost), and the time is extrapolated linearly to a 1 mm
brain of 1.7 M voxels: t(N) = t(n1) + (N - n1) (t(n2) - t(n1)) / (n2 - n1), for the wall time
and for the process's CPU time (the wall time on an idle machine, as the fits are single-threaded
numpy). CCM's database is
built once beforehand (a one-off cost, like training; reported separately). The LSTM and DNN run
through evaluate.METHODS with the bundled models when those exist, timed on every in-mask voxel of
the patient (they build features for the whole brain on each call). The machine is shared: the
JSON records the load average, and times on an idle machine will be lower.

    .venv/bin/python benchmarks/bench_methods.py [--data data/sim2mm_snr100] [--patient P03]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "OEFPredictor"))

from OEFPredictorLib import baselines, simulate  # noqa: E402

BRAIN_1MM = 1_700_000


def _patient(data: str | None, pid: str):
    if data and (Path(data) / pid).exists():
        return simulate.load_patient(Path(data) / pid), data
    tmp = Path(tempfile.mkdtemp(prefix="bench_methods_"))
    simulate.simulate_dataset(tmp, n_patients=int(pid[1:]), seed=0, voxel_size=2.0)
    return simulate.load_patient(tmp / pid), str(tmp)


def _time(fn) -> tuple[float, float]:
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(REPO / "data" / "sim2mm_snr100"))
    ap.add_argument("--patient", default="P03")
    ap.add_argument("--sizes", default="10000,40000", help="two subsample sizes (voxels)")
    ap.add_argument("--methods", default="nlls,cat,ccm,lstm,dnn")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "methods.json"))
    args = ap.parse_args(argv)
    n1, n2 = (int(x) for x in args.sizes.split(","))
    patient, dataset = _patient(args.data, args.patient)
    in_mask = np.flatnonzero(patient.metric_mask[patient.mask])
    rng = np.random.default_rng(0)
    subsets = {n: np.sort(rng.choice(in_mask, n, replace=False)) for n in (n1, n2)}

    predictors, notes = {}, {}
    ctx = None
    for m in args.methods.split(","):
        if m in baselines.METHODS:
            if m == "ccm":
                class Ctx:  # the evaluate.MethodContext fields the factory reads
                    pass
                ctx = Ctx()
                ctx.dataset = Path(dataset)
                wall, cpu = _time(lambda: predictors.__setitem__(m, baselines.evaluate_factory(m)(ctx)))
                notes[m] = {"database_build_s": round(wall, 2),
                            "database": f"{len(baselines.training_ccm_parameters(str(Path(dataset).resolve())).get('Y'))} "
                                        "parameter tuples of the training patients' truth"}
            else:
                predictors[m] = baselines.evaluate_factory(m)(None)
            continue
        try:
            from OEFPredictorLib import evaluate
            predictors[m] = evaluate.METHODS[m](evaluate.MethodContext(Path(dataset)))
        except Exception as exc:  # no bundled model yet, or evaluate.py not there
            notes[m] = {"skipped": f"{type(exc).__name__}: {exc}"}

    results = {}
    for m, predict in predictors.items():
        predict(patient, subsets[n1][:500])  # warm-up: imports, graph tracing, caches
        if m in baselines.METHODS:
            (w1, c1), (w2, c2) = (_time(lambda n=n: predict(patient, subsets[n])) for n in (n1, n2))
        else:
            # The Keras predictors build features for the whole brain on every call (a fixed cost
            # that is per-voxel for a whole brain), so time them on every in-mask voxel: the line
            # through the origin and that point.
            everything = np.arange(int(patient.mask.sum()))
            w2, c2 = _time(lambda: predict(patient, everything))
            w1 = c1 = 0.0
            n1_used, n2_used = 0, everything.size
        if m in baselines.METHODS:
            n1_used, n2_used = n1, n2
        per_voxel = max(w2 - w1, 1e-9) / (n2_used - n1_used)
        cpu_per_voxel = max(c2 - c1, 1e-9) / (n2_used - n1_used)
        results[m] = {
            "label": baselines.METHOD_LABELS.get(m, m),
            "measured": {f"{n1_used}_voxels_s": round(w1, 3), f"{n2_used}_voxels_s": round(w2, 3),
                         f"{n1_used}_voxels_cpu_s": round(c1, 3), f"{n2_used}_voxels_cpu_s": round(c2, 3)},
            "voxels_per_s": round(1.0 / per_voxel, 1),
            "seconds_per_1mm_brain": round(w1 + (BRAIN_1MM - n1_used) * per_voxel, 1),
            "minutes_per_1mm_brain": round((w1 + (BRAIN_1MM - n1_used) * per_voxel) / 60, 2),
            # CPU time of this process (all its threads): an upper bound for an idle machine's wall
            # time (the Keras models use both cores, the classical fits one)
            "cpu_minutes_per_1mm_brain": round((c1 + (BRAIN_1MM - n1_used) * cpu_per_voxel) / 60, 2),
            **notes.get(m, {}),
        }
        print(f"{m:5s} {results[m]['voxels_per_s']:9.0f} voxels/s  "
              f"{results[m]['minutes_per_1mm_brain']:7.2f} min (CPU {results[m]['cpu_minutes_per_1mm_brain']:.2f} min) "
              "per 1.7 M-voxel brain", flush=True)
    for m, note in notes.items():
        if m not in results:
            results[m] = note
    previous = {}
    if Path(args.out).exists():  # keep the other methods' entries when re-measuring a few
        previous = json.loads(Path(args.out).read_text(encoding="utf-8")).get("methods", {})
    results = {**{m: r for m, r in previous.items() if "skipped" not in r}, **results}
    out = {
        "benchmark": "time per brain of each OEF method (benchmarks/bench_methods.py)",
        "patient": f"{Path(dataset).name}/{args.patient}, brain voxels without CSF, random subsamples",
        "subsample_voxels": [n1, n2],
        "extrapolated_to_voxels": BRAIN_1MM,
        "extrapolation": "linear through the two subsample times (fixed costs kept once)",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
                    "note": "shared 2-core machine; other jobs were running (see load average)"},
        "methods": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
