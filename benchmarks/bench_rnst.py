"""RNST against plain denoisers on held-out simulated low-field / high-field pairs
-> benchmarks/results/rnst.json and rnst.md.

Pairs (RNSTFieldTransferLib/pairs.py): 3-slice axial slabs at 1.5 mm of the MNI152 T1 and of
virtual patient 2 (styles: a deformed MNI, virtual patient 1002), Rician noise 0.03 / 0.06 / 0.10.
Held out: the preset and the ablation of docs/rnst were looked at on virtual patient 1 only.
Methods: the input, non-local means, BM3D (if the optional package is installed), RNST `fast`
(VGG16, torchvision weights) on every case, and RNST `fast` with the Keras (Caffe-convention)
VGG16 weights on the 0.06 cases (fewer cases for CPU time). PSNR over the slab and mean 2D SSIM,
each image min-max scaled (volume.quality). Times are wall seconds on the 2 shared CPU cores;
the JSON records the load average.

    nice -n 5 .venv/bin/python benchmarks/bench_rnst.py [--keras-vgg16 FILE.h5|.npz]

--keras-vgg16: the Keras VGG16 weights (the published notop .h5, or an .npz of its 13
convolutions); without it the Caffe-convention rows are left out.
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
sys.path.insert(0, str(REPO / "RNSTFieldTransfer"))

from RNSTFieldTransferLib import nst, pairs, rnst, volume  # noqa: E402

SOURCES = ("mni", "patient2")
CAFFE_NOISE = 0.06


def caffe_model(path):
    from RNSTFieldTransferLib import weights as w
    if str(path).endswith(".npz"):
        with np.load(path) as data:
            weights = {k: data[k] for k in data.files}
    else:
        _, top = w.identify_keras_file(path)
        weights = w.keras_vgg16_weights(path, top)
    return nst.build_vgg16_features(weights, nst.VGG16_CAFFE)


def run_case(pair, model, backbone, preset):
    t0 = time.time()
    res = volume.transfer_volume(pair.low, pair.style, preset=preset, axis=0, model=model,
                                 backbone=backbone)
    return volume.quality(res.output, pair.reference), time.time() - t0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keras-vgg16")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    preset = rnst.get_preset("fast")
    model, backbone = nst.build_model("vgg16")
    caffe = caffe_model(args.keras_vgg16) if args.keras_vgg16 else None
    rows = []
    for source in SOURCES:
        for noise in pairs.NOISE_LEVELS:
            pair = pairs.make_pair(source, noise, seed=0)
            row = {"pair": source, "noise_sigma": noise, "slab": list(pair.low.shape),
                   "input": volume.quality(pair.low, pair.reference)}
            low01 = volume.minmax(pair.low)
            for kind in ("nlm", "bm3d") if rnst.bm3d_available() else ("nlm",):
                t0 = time.time()
                d = np.stack([rnst.denoise(s, kind) for s in low01])
                row[kind], row[f"{kind}_seconds"] = (volume.quality(d, pair.reference),
                                                     time.time() - t0)
            row["rnst_fast_vgg16"], row["rnst_fast_vgg16_seconds"] = run_case(
                pair, model, backbone, preset)
            if caffe is not None and noise == CAFFE_NOISE:
                row["rnst_fast_vgg16_keras"], row["rnst_fast_vgg16_keras_seconds"] = run_case(
                    pair, caffe, nst.VGG16_CAFFE, preset)
            rows.append(row)
            print(json.dumps(row), flush=True)
    meta = {"preset": preset.__dict__ | {"budgets": list(preset.budgets),
                                         "step_multipliers": list(preset.step_multipliers)},
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
            "load_average_at_end": os.getloadavg(), "device": nst.compute_device()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "rnst.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (out / "rnst.md").write_text(table(rows))
    print(table(rows))


METHODS = (("input", "input"), ("nlm", "NLM"), ("bm3d", "BM3D"),
           ("rnst_fast_vgg16", "RNST fast, VGG16 (torchvision)"),
           ("rnst_fast_vgg16_keras", "RNST fast, VGG16 (Keras/Caffe)"))


def table(rows) -> str:
    lines = ["| pair | noise | method | PSNR dB | SSIM | seconds (3 slices) |", "|---|---|---|---|---|---|"]
    for r in rows:
        for key, label in METHODS:
            if key not in r:
                continue
            (p, s), t = r[key], r.get(f"{key}_seconds")
            best = [m for m, _ in METHODS[1:] if m in r]
            mark = lambda v, i: f"**{v}**" if max(r[m][i] for m in best) == r[key][i] and key != "input" else v
            lines.append(f"| {r['pair']} {'x'.join(map(str, r['slab'][1:]))} | {r['noise_sigma']:.2f} | "
                         f"{label} | {mark(f'{p:.2f}', 0)} | {mark(f'{s:.3f}', 1)} | "
                         f"{'' if t is None else f'{t:.0f}'} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
