"""Training and inference throughput of the paper's LSTM and the DNN, next to their FLOPs.

    .venv/bin/python benchmarks/bench_model.py [--train-steps 20] [--infer 40000] \
        [--out benchmarks/results/model.json]

- Models: the paper's LSTM (Input(5, 9), LSTM 512-256-128-64, Dense 64-32-16, Dense 5) and the DNN
  (Input(1, 9), Dense 256-256-128, Dense 5), built fresh; speed does not depend on the weights.
- Training: sequences/s of `train_on_batch` with the paper's recipe (Huber, Adam, batch 512) after
  3 warm-up steps. Inference: sequences/s of `model.predict` with batch 8192 (what `evaluate` uses).
  Inputs are random windows of the right shape (speed does not depend on the values).
- FLOPs per sequence, analytic (a multiply-add counts 2, biases 1 each, activations and the
  element-wise gate products are left out: they are O(units), the matrix products O(units^2)):
      LSTM layer (input n, units u, T steps): T * (2 * 4u * (n + u) + 4u)
      GRU layer: T * (2 * 3u * (n + u) + 6u)   (Keras reset_after: two bias vectors)
      Dense (n -> u): 2 * n * u + u
  Every recurrent layer runs all T = 5 steps (the last one returns only the last output).
  Training costs about 3x the forward FLOPs (forward + two backward products).
- The machine is shared: the JSON records the CPU count and the load average at the start, so
  numbers taken under load read as such.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "OEFPredictor"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def flops_per_sequence(spec: dict, window_length: int, n_features: int = 9, n_outputs: int = 5) -> int:
    """Forward FLOPs of one sequence, from the layer sizes (formula in the module docstring)."""
    flops, n = 0, n_features
    if spec["architecture"] == "lstm":
        gates = {"lstm": 4, "gru": 3}[spec.get("cell", "lstm")]
        for u in spec["units"]:
            bias = 4 * u if gates == 4 else 6 * u
            flops += window_length * (2 * gates * u * (n + u) + bias)
            n = u
    else:
        n = n_features * window_length  # Flatten
    for u in list(spec["dense"]) + [n_outputs]:
        flops += 2 * n * u + u
        n = u
    return flops


def measure(spec: dict, window_length: int, train_steps: int, n_infer: int, batch: int = 512) -> dict:
    import keras

    from OEFPredictorLib import models
    from OEFPredictorLib.training import lstm as train

    keras.utils.set_random_seed(0)
    model = models.build_model(spec, window_length=window_length)
    train.compile_model(model, 1e-4)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch, window_length, 9)).astype(np.float32)
    y = rng.normal(size=(batch, 5)).astype(np.float32)
    for _ in range(3):  # warm-up: graph tracing
        model.train_on_batch(x, y)
    t0 = time.perf_counter()
    for _ in range(train_steps):
        model.train_on_batch(x, y)
    train_s = time.perf_counter() - t0
    xi = rng.normal(size=(n_infer, window_length, 9)).astype(np.float32)
    model.predict(xi[:8192], batch_size=8192, verbose=0)  # warm-up
    t0 = time.perf_counter()
    model.predict(xi, batch_size=8192, verbose=0)
    infer_s = time.perf_counter() - t0
    flops = flops_per_sequence(spec, window_length)
    return {
        "parameters": int(model.count_params()),
        "flops_per_sequence_forward": flops,
        "flops_per_sequence_training_approx": 3 * flops,
        "train_sequences_per_second": round(train_steps * batch / train_s, 1),
        "train_batch_size": batch, "train_steps_timed": train_steps,
        "inference_sequences_per_second": round(n_infer / infer_s, 1),
        "inference_batch_size": 8192, "inference_sequences_timed": n_infer,
        "train_gflops_per_second": round(3 * flops * train_steps * batch / train_s / 1e9, 2),
        "inference_gflops_per_second": round(flops * n_infer / infer_s / 1e9, 2),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-steps", type=int, default=20)
    parser.add_argument("--infer", type=int, default=40000, help="sequences timed for inference")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "model.json"))
    args = parser.parse_args(argv)

    import keras
    import tensorflow as tf

    from OEFPredictorLib import models

    load = os.getloadavg()
    results = {
        "what": "training and inference throughput (sequences/s) and analytic FLOPs per sequence",
        "command": "python benchmarks/bench_model.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {"cpu_count": os.cpu_count(), "load_average_at_start": [round(x, 2) for x in load],
                    "platform": platform.platform(), "python": platform.python_version(),
                    "keras": keras.__version__, "backend": keras.backend.backend(), "tensorflow": tf.__version__,
                    "device": "CPU" if not tf.config.list_physical_devices("GPU") else "GPU"},
        "flops_formula": {"lstm_layer": "T * (2 * 4u * (n + u) + 4u)", "gru_layer": "T * (2 * 3u * (n + u) + 6u)",
                          "dense": "2 * n * u + u", "note": "multiply-add = 2 FLOPs; activations and gate "
                          "products left out; T = 5 steps for every recurrent layer"},
        "models": {},
    }
    for name, spec, length in (("paper_lstm", models.PAPER_LSTM, 5), ("paper_dnn", models.PAPER_DNN, 1)):
        print(f"{name} ...", file=sys.stderr)
        results["models"][name] = {"spec": spec, "window_length": length,
                                   **measure(spec, length, args.train_steps, args.infer)}
        print(json.dumps(results["models"][name], indent=1), file=sys.stderr)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    tmp.replace(out)
    print(f"Wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
