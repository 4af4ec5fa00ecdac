"""Prediction speed and memory: the engine (predict_maps) against plain model.predict.

    .venv/bin/python benchmarks/bench_predict.py [--voxels 40000] [--out benchmarks/results/predict.json]

- Model: the bundled LSTM (Resources/Models/oef_lstm.keras); when it is not installed, the paper's
  architecture (512-256-128-64 LSTM, 64-32-16 dense) with random weights, which costs the same.
- Speed: a 1 mm virtual patient; the engine runs on the first --voxels brain voxels (C order; the
  whole brain takes minutes on a shared 2-core CPU), then plain model.predict runs on exactly the
  same windows in the same process (default batch size 32, and the engine's batch size). The
  whole-brain time is extrapolated from the measured throughput (stated as such in the JSON).
- Memory: peak RSS (psutil, sampled) of a fresh process that predicts the same number of voxels
  inside a 2 mm and a 1 mm volume: the difference is the input/output arrays only, the chunked part
  does not grow with the volume.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "OEFPredictor"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def load_model():
    from OEFPredictorLib import models, physics, resources, sequences

    try:
        return models.load_bundle(resources.bundled_model_path("lstm")), "bundled"
    except Exception:
        model = models.build_model(models.PAPER_LSTM)
        scaling = {"parameters": list(physics.PARAMETER_NAMES), "mean": [1, 20, 0.6, 0.03, 0], "std": [1, 1, 1, 1, 1]}
        card = models.make_card(models.PAPER_LSTM, physics.Protocol.default(), scaling, sequences.WINDOW_LENGTH,
                                "centre")
        return models.ModelBundle(model, card, Path("paper_lstm_random_weights.keras")), "paper architecture, random weights"


def make_volume(voxel_size: float):
    from OEFPredictorLib import phantom, physics, simulate

    patient = phantom.make_patient(np.random.SeedSequence([7, 3]),
                                   phantom.PatientConfig(voxel_size=voxel_size, independent_fraction=0.0, lesions=False))
    echoes, qsm, _ = simulate.synthesize(patient.params, patient.mask, physics.Protocol.default(),
                                         simulate.NoiseModel(), np.random.default_rng(0))
    return echoes, qsm, patient.mask


def subset_mask(mask: np.ndarray, n: int) -> np.ndarray:
    sub = np.zeros(mask.size, bool)
    sub[np.flatnonzero(mask)[:n]] = True
    return sub.reshape(mask.shape)


class PeakRSS:
    """Peak resident memory of this process, sampled every 20 ms."""

    def __enter__(self):
        import psutil

        self.proc, self.peak, self._stop = psutil.Process(), 0, threading.Event()
        self._t = threading.Thread(target=self._sample, daemon=True)
        self._t.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.02)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def memory_run(voxel_size: float, n: int) -> dict:
    """(in a fresh process) peak RSS of one engine run on n voxels of a volume of this voxel size."""
    from OEFPredictorLib import physics, predict

    echoes, qsm, mask = make_volume(voxel_size)
    bundle, _ = load_model()
    inputs = predict.PredictionInputs(echoes, qsm, physics.Protocol.default(), subset_mask(mask, n))
    with PeakRSS() as rss:
        predict.predict_maps(inputs, model=bundle, device="cpu")
    return {"voxel_size_mm": voxel_size, "volume_shape": list(mask.shape), "brain_voxels": int(mask.sum()),
            "predicted_voxels": n, "input_arrays_mib": round((echoes.nbytes + qsm.nbytes) / 2 ** 20, 1),
            "peak_rss_mib": round(rss.peak / 2 ** 20, 1)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--voxels", type=int, default=40_000, help="brain voxels measured (default 40000)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "predict.json"))
    ap.add_argument("--memory-child", type=float, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_child is not None:
        print(json.dumps(memory_run(args.memory_child, args.voxels)))
        return

    import keras

    from OEFPredictorLib import models, physics, predict, sequences

    bundle, model_kind = load_model()
    echoes, qsm, mask = make_volume(1.0)
    n = min(args.voxels, int(mask.sum()))
    inputs = predict.PredictionInputs(echoes, qsm, physics.Protocol.default(), subset_mask(mask, n))
    # warm-up (graph tracing, fs table) on a few voxels, outside the timings
    predict.predict_maps(predict.PredictionInputs(echoes, qsm, physics.Protocol.default(), subset_mask(mask, 5000)),
                         model=bundle, device="cpu")
    t0 = time.perf_counter()
    result = predict.predict_maps(inputs, model=bundle, device="cpu")
    engine_s = time.perf_counter() - t0

    idx = np.flatnonzero(inputs.mask)
    features, _ = sequences.voxel_features(echoes.reshape(-1, 8)[idx], qsm.reshape(-1)[idx], bundle.qsm_scale)
    windows = sequences.make_windows(features, 0, len(features), bundle.window_length, bundle.window_target)
    plain = {}
    for batch in (32, predict.DEFAULT_BATCH):
        bundle.model.predict(windows[:batch * 2], batch_size=batch, verbose=0)  # warm-up
        t0 = time.perf_counter()
        bundle.model.predict(windows, batch_size=batch, verbose=0)
        plain[batch] = time.perf_counter() - t0

    memory = []
    for size in (2.0, 1.0):
        out = subprocess.run([sys.executable, __file__, "--memory-child", str(size), "--voxels", str(n)],
                             capture_output=True, text=True, check=True)
        memory.append(json.loads(out.stdout.strip().splitlines()[-1]))

    brain = int(mask.sum())
    rate = n / engine_s
    record = {
        "what": "OEF prediction speed (engine vs plain model.predict) and peak memory",
        "command": "python benchmarks/bench_predict.py --voxels %d" % args.voxels,
        "model": model_kind, "keras": keras.__version__, "backend": keras.backend.backend(),
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "load_average_1min_at_end": round(os.getloadavg()[0], 2),
                    "note": "shared machine: other jobs ran at the same time; treat times as upper bounds"},
        "device": result.device,
        "patient_1mm": {"volume_shape": list(mask.shape), "brain_voxels": brain},
        "measured_voxels": n,
        "measured_subset": f"the first {n} brain voxels (C order) of the 1 mm patient, not the whole brain",
        "engine_s": round(engine_s, 2),
        "engine_sequences_per_s": round(rate, 1),
        "engine_includes": "mask, features, windows, network, decoding, clamping, quality map, OEF, map assembly",
        "plain_model_predict_s": {f"batch_{b}": round(s, 2) for b, s in plain.items()},
        "ratio_engine_to_plain_predict": {f"batch_{b}": round(s / engine_s, 3) for b, s in plain.items()},
        "ratio_target": ">= 0.9",
        "whole_brain_1mm_extrapolated_s": round(brain / rate, 1),
        "whole_brain_extrapolation": "brain_voxels / engine_sequences_per_s (linear: the work is per voxel)",
        "chunk_voxels_at_1024_mib": predict.chunk_size_for(bundle, 9, 1024),
        "memory": memory,
        "memory_target": "< 4 GiB peak RSS; chunked part independent of the volume size",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
