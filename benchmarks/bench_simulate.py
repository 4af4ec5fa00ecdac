"""Benchmark: simulating one 1 mm virtual patient (anatomy, parameters, signals, files).

Target: under 60 s on the 2-core machine. Writes benchmarks/results/simulate.json.
Run: .venv/bin/python benchmarks/bench_simulate.py [--voxel-size 1]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from OEFPredictorLib import io, phantom, physics, simulate

RESULTS = Path(__file__).parent / "results" / "simulate.json"


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--voxel-size", type=float, default=1.0)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()

    t0 = time.perf_counter()
    phantom._templates()  # cached template preparation, once per process
    t_templates = time.perf_counter() - t0

    seed_anatomy, seed_noise = simulate.patient_seed(0, 3).spawn(2)
    t0 = time.perf_counter()
    patient = phantom.make_patient(seed_anatomy, phantom.PatientConfig(voxel_size=args.voxel_size, lesions=True))
    t_phantom = time.perf_counter() - t0

    protocol, noise = physics.Protocol.default(), simulate.NoiseModel(100.0, 2.0)
    t0 = time.perf_counter()
    echoes, qsm, sigma = simulate.synthesize(patient.params, patient.mask, protocol, noise,
                                             np.random.default_rng(seed_noise))
    t_signal = time.perf_counter() - t0

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        simulate.write_patient(Path(tmp), "P03", patient, echoes, qsm, protocol, noise, sigma, {})
        t_write = time.perf_counter() - t0
        size_mb = sum(f.stat().st_size for f in Path(tmp).iterdir()) / 1e6

    total = t_templates + t_phantom + t_signal + t_write
    result = {
        "benchmark": "simulate one virtual patient",
        "voxel_size_mm": args.voxel_size,
        "grid": list(patient.mask.shape),
        "brain_voxels": int(patient.mask.sum()),
        "protocol": protocol.describe(),
        "noise": noise.describe(),
        "seconds": {"templates_once_per_process": round(t_templates, 2), "phantom": round(t_phantom, 2),
                    "signals_and_noise": round(t_signal, 2), "write_files": round(t_write, 2),
                    "total": round(total, 2)},
        "target_seconds": 60,
        "meets_target": total < 60,
        "files_mb": round(size_mb, 1),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    io.write_json(result, args.out)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
