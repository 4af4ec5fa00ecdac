"""Benchmark: cohort throughput of `oefpredictor batch` (subjects per hour with 1 and 2 local Dask
workers) and its overhead over plain `oefpredictor predict` per subject.

A simulated BIDS cohort (default 4 subjects at 3 mm, SNR 100) is predicted with predict's default
method and bundled model: by `batch --workers 1`, by `batch --workers 2` (fresh output folders), and
subject by subject with `oefpredictor predict` (a new process each, as a shell loop would). All
three run the command line in a subprocess. Writes benchmarks/results/batch.json.
Run: .venv/bin/python benchmarks/bench_batch.py [--subjects 4] [--voxel-size 3]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from OEFPredictorLib import io

RESULTS = Path(__file__).parent / "results" / "batch.json"


def cli(*args) -> float:
    """Run `oefpredictor ARGS` in a new process; its wall time in seconds."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "OEFPredictorLib.cli", *map(str, args)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise SystemExit(f"oefpredictor {args[0]} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--subjects", type=int, default=4)
    parser.add_argument("--voxel-size", type=float, default=3.0)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        raw = tmp / "raw"
        cli("simulate", "--bids", "--out", raw, "--patients", args.subjects, "--voxel-size", args.voxel_size)
        deriv = raw / "derivatives" / "simulate"
        load_before = os.getloadavg()
        runs = {}
        for workers in (1, 2):
            out = tmp / f"batch{workers}"
            seconds = cli("batch", raw, out, "--derivatives", deriv, "--workers", workers)
            records = [io.read_json(p) for p in out.glob("sub-*/.oefpredictor-batch.json")]
            runs[workers] = {"seconds": round(seconds, 1), "subjects_per_hour": round(3600 * args.subjects / seconds, 1),
                             "mean_unit_seconds": round(sum(r["time_s"] for r in records) / len(records), 1),
                             "mean_predict_seconds": round(sum(r["predict_s"] for r in records) / len(records), 1)}
            voxels = [r["n_voxels"] for r in records]
        plain = []
        for s in range(1, args.subjects + 1):
            pid = f"P{s:02d}"
            anat = raw / f"sub-{pid}" / "anat"
            echoes = sorted(anat.glob("*_MEGRE.nii.gz"), key=lambda p: int(p.name.split("echo-")[1].split("_")[0]))
            plain.append(cli("predict", "--echoes", *echoes, "--qsm", anat / f"sub-{pid}_Chimap.nii.gz",
                             "--mask", deriv / f"sub-{pid}" / "anat" / f"sub-{pid}_desc-brain_mask.nii.gz",
                             "--out", tmp / f"predict_{pid}"))
        load_after = os.getloadavg()

    per_subject_plain = sum(plain) / len(plain)
    per_subject_batch1 = runs[1]["seconds"] / args.subjects
    result = {
        "benchmark": "oefpredictor batch over a simulated BIDS cohort (local Dask cluster)",
        "subjects": args.subjects, "voxel_size_mm": args.voxel_size,
        "mean_brain_voxels": round(sum(voxels) / len(voxels)),
        "method": "predict's default, bundled model",
        "batch_workers_1": runs[1], "batch_workers_2": runs[2],
        "plain_predict_per_subject_seconds": round(per_subject_plain, 1),
        "plain_predict_subjects_per_hour": round(3600 / per_subject_plain, 1),
        "batch_1_worker_seconds_per_subject": round(per_subject_batch1, 1),
        "overhead_batch_1_worker_vs_predict_per_subject_seconds": round(per_subject_batch1 - per_subject_plain, 1),
        "speedup_2_vs_1_workers": round(runs[1]["seconds"] / runs[2]["seconds"], 2),
        "load_average_1min_before_after": [round(load_before[0], 2), round(load_after[0], 2)],
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    io.write_json(result, args.out)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
