"""The README's lesion figure: one stroke-like test patient, truth vs the paper's LSTM vs the spatial
model, and the spatial model's interval width.

    .venv/bin/python docs/evaluation/lesion_figure.py data/stroke_test2/P01 docs/images/lesion_comparison.png
"""
from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "OEFPredictor"))


def main(patient_dir: str, out_png: str) -> int:
    from OEFPredictorLib import figures, methods, predict, simulate

    data = simulate.load_patient(patient_dir)
    inputs = predict.PredictionInputs(data.echoes, data.qsm, data.protocol, data.mask, spacing=data.geometry.spacing)
    maps = {name: predict.predict_maps(inputs, method=name, device="cpu").maps for name in ("lstm", "context")}
    labels = {name: methods.get(name).label for name in maps}
    print(figures.method_comparison(data, maps, out_png, labels))
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
