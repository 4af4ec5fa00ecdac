"""Speed and memory of the spatial models (the context model, the default method, and the
experimental U-Net) against the paper's LSTM.

    .venv/bin/python benchmarks/bench_spatial.py [--out benchmarks/results/spatial.json] [--lstm-voxels 40000]

- 1 mm: predict_maps with each bundled spatial model on a whole simulated 1 mm brain (stroke-like
  patient, SNR 100), end to end (mask, features, resampling to the 2 mm model grid, network, back to
  1 mm, quality map), in a fresh process whose peak RSS is sampled (psutil).
- another echo train (12 echoes 3.5/4.1 ms, 3 T): the context model with its decay resampled to the
  model's protocol (decay.resample_echoes), at 1 and 2 mm, time and peak memory;
- 2 mm: the same end-to-end time on a whole 2 mm brain for the spatial model and for the paper's
  LSTM; the LSTM runs --lstm-voxels brain voxels and its whole-brain time is extrapolated from that
  throughput (said so in the JSON), since the whole brain takes minutes on two cores.
- with a field map (--field-map): the context model at 1 mm with and without the field-gradient
  correction (a field of FIELD_GRADIENT_HZ_PER_MM along z), time and peak memory, into
  spatial_field_map.json (only these rows).
Each timing is the median of --repeats runs after one warm-up run (model loading and graph tracing
excluded, as for a Slicer user's second Apply). The JSON records the CPU count and load average:
other jobs on a shared machine make the times upper bounds.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "OEFPredictor"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


OTHER_ECHOES_MS = [3.5 + 4.1 * i for i in range(12)]  # an echo train the context model resamples


def protocol_of(echoes_ms):
    from OEFPredictorLib import physics

    return physics.Protocol.from_milliseconds(echoes_ms, 3.0) if echoes_ms else physics.Protocol.default()


def make_volume(voxel_size: float, echoes_ms=None):
    from OEFPredictorLib import phantom, simulate

    patient = phantom.make_patient(np.random.SeedSequence([7, 4]), phantom.PatientConfig.stroke(voxel_size))
    echoes, qsm, _ = simulate.synthesize(patient.params, patient.mask, protocol_of(echoes_ms),
                                         simulate.NoiseModel(), np.random.default_rng(0))
    return echoes, qsm, patient.mask


FIELD_GRADIENT_HZ_PER_MM = 1.0


def time_method(method: str, voxel_size: float, repeats: int, max_voxels: int | None = None, echoes_ms=None,
                field_map: bool = False) -> dict:
    from OEFPredictorLib import predict

    echoes, qsm, mask = make_volume(voxel_size, echoes_ms)
    field = None
    if field_map:  # the echoes stay as made: only the correction's cost is measured
        field = (FIELD_GRADIENT_HZ_PER_MM * voxel_size * np.indices(mask.shape)[0]).astype(np.float32)
    n_brain = int(mask.sum())
    if max_voxels is not None and max_voxels < n_brain:
        sub = np.zeros(mask.size, bool)
        sub[np.flatnonzero(mask)[:max_voxels]] = True
        mask = sub.reshape(mask.shape)
    inputs = predict.PredictionInputs(echoes, qsm, protocol_of(echoes_ms), mask, spacing=(voxel_size,) * 3,
                                      field_map=field)
    predict.predict_maps(inputs, method=method, device="cpu")  # warm-up: load, trace
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        predict.predict_maps(inputs, method=method, device="cpu")
        times.append(time.perf_counter() - t0)
    seconds = float(np.median(times))
    n = int(mask.sum())
    return {"method": method, "protocol": protocol_of(echoes_ms).describe(), "voxel_size_mm": voxel_size,
            "volume_shape": list(mask.shape), "brain_voxels": n_brain,
            "voxels_predicted": n, "seconds": round(seconds, 3), "runs": [round(t, 3) for t in times],
            "seconds_per_brain": round(seconds * n_brain / n, 2),
            "whole_brain": "measured" if n == n_brain else f"extrapolated from {n} voxels", "field_map": field_map}


def peak_rss_child(method: str, voxel_size: float, echoes_ms=None, field_map: bool = False) -> dict:
    """Peak RSS of a fresh process that predicts one whole brain with a spatial model."""
    code = (f"import sys; sys.path.insert(0, {str(REPO / 'OEFPredictor')!r}); sys.path.insert(0, {str(REPO / 'benchmarks')!r});"
            f"import bench_spatial as b; print(b.time_method({method!r}, {voxel_size}, 1, None, {echoes_ms!r}, "
            f"{field_map!r})['seconds'])")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    import psutil

    peak, p = 0, psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            peak = max(peak, p.memory_info().rss)
        except psutil.Error:
            break
        time.sleep(0.05)
    proc.communicate()
    return {"method": method, "protocol": protocol_of(echoes_ms).describe(), "voxel_size_mm": voxel_size,
            "peak_rss_gib": round(peak / 2 ** 30, 3), "field_map": field_map,
            "note": "whole process: Python, TensorFlow, the simulated patient and its maps"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "spatial.json"))
    parser.add_argument("--lstm-voxels", type=int, default=40_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--field-map", action="store_true",
                        help="only the rows with and without the field-gradient correction (1 mm, context), "
                             "into spatial_field_map.json")
    args = parser.parse_args()
    load = os.getloadavg()
    results = {"cpu_count": os.cpu_count(), "load_average_at_start": [round(x, 2) for x in load],
               "python": platform.python_version(), "machine": platform.machine()}
    if args.field_map:
        results["field_gradient_hz_per_mm"] = FIELD_GRADIENT_HZ_PER_MM
        results["context_1mm"] = time_method("context", 1.0, args.repeats)
        results["context_1mm_field_map"] = time_method("context", 1.0, args.repeats, field_map=True)
        results["memory"] = [peak_rss_child("context", 1.0), peak_rss_child("context", 1.0, field_map=True)]
        out = Path(args.out).with_name("spatial_field_map.json")
        out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        print(json.dumps(results, indent=2))
        return 0
    results["lstm_2mm"] = time_method("lstm", 2.0, 1, args.lstm_voxels)
    results["memory"] = []
    for method in ("context", "unet"):
        results[f"{method}_1mm"] = time_method(method, 1.0, args.repeats)
        results[f"{method}_2mm"] = time_method(method, 2.0, args.repeats)
        results[f"speedup_2mm_{method}_vs_lstm"] = round(results["lstm_2mm"]["seconds_per_brain"]
                                                         / results[f"{method}_2mm"]["seconds_per_brain"], 1)
        results["memory"].append(peak_rss_child(method, 1.0))
    results["context_1mm_other_protocol"] = time_method("context", 1.0, args.repeats, None, OTHER_ECHOES_MS)
    results["context_2mm_other_protocol"] = time_method("context", 2.0, args.repeats, None, OTHER_ECHOES_MS)
    results["memory"].append(peak_rss_child("context", 1.0, OTHER_ECHOES_MS))
    results["targets"] = {"spatial_1mm_seconds_max": 10.0, "speedup_2mm_min": 10.0, "peak_rss_1mm_gib_max": 2.0}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
