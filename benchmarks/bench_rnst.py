"""RNST against plain denoisers on held-out simulated low-field / high-field pairs
-> benchmarks/results/rnst.json and rnst.md (rewritten after every case).

Pairs (RNSTFieldTransferLib/pairs.py): axial slabs at 1.5 mm of the MNI152 T1 and of virtual
patient 2 (styles: a deformed MNI, virtual patient 1002), Rician noise 0.03 / 0.06 / 0.10.
Held out: the preset and the ablation were looked at on virtual patient 1 only.
Stage 1, every case, the middle slice of the slab: the input, non-local means, BM3D (if the
optional package is installed), RNST `fast` (VGG16, torchvision weights).
Stage 2, one case: RNST `fast` with the Keras (Caffe-convention) VGG16 weights.
Stage 3, one case: the whole 3-slice slab with RNST `fast`, for the time of a 140 x 118 slab.
PSNR and SSIM with each image min-max scaled (volume.quality). Times: wall seconds and the
process's CPU seconds (all threads); the 2 cores are shared with other work at lower priority,
so the wall times are upper bounds; CPU seconds / 2 is the wall time on 2 idle cores if both are
kept busy. The JSON records the load average. The `paper` preset is not run (about 7 hours of
CPU per slice).

    nice -n 5 .venv/bin/python benchmarks/bench_rnst.py [--keras-vgg16 FILE.h5|.npz]

--keras-vgg16: the Keras VGG16 weights (the published notop .h5, or an .npz of its 13
convolutions); without it stage 2 is left out.
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


def run_case(pair, model, backbone, preset, slices=None):
    """RNST on `slices` of the slab (None: all): ((PSNR, SSIM), wall s, CPU s)."""
    sl = slice(None) if slices is None else slices
    low, style, ref = pair.low[sl], pair.style[sl], pair.reference[sl]
    t0, c0 = time.time(), time.process_time()
    res = volume.transfer_volume(low, style, preset=preset, axis=0, model=model,
                                 backbone=backbone)
    return volume.quality(res.output, ref), time.time() - t0, time.process_time() - c0


MIDDLE = slice(1, 2)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keras-vgg16")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    ap.add_argument("--resume", action="store_true", help="keep the cases already in rnst.json")
    ap.add_argument("--skip-slab", action="store_true", help="leave out the 3-slice timing")
    args = ap.parse_args(argv)
    preset = rnst.get_preset("fast")
    model, backbone = nst.build_model("vgg16")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"preset": {"name": preset.name, "outer_iterations": preset.outer_iterations,
                       "budgets": list(preset.budgets), "denoiser": preset.denoiser},
            "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared)",
            "device": nst.compute_device()}
    rows = []
    if args.resume and (out / "rnst.json").is_file():
        rows = json.loads((out / "rnst.json").read_text())["rows"]
    done = {(r["pair"], r["noise_sigma"], r["slices"], tuple(k for k in r if k.startswith("rnst")))
            for r in rows}

    def have(source, noise, slices, key):
        return any(d[:3] == (source, noise, slices) and key in d[3] for d in done)

    def save():
        meta["load_average"] = os.getloadavg()
        (out / "rnst.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        (out / "rnst.md").write_text(table(rows))

    pair_cache = {}
    for source in SOURCES:
        for noise in pairs.NOISE_LEVELS:
            if have(source, noise, "middle", "rnst_fast_vgg16"):
                continue
            pair = pair_cache[(source, noise)] = pairs.make_pair(source, noise, seed=0)
            ref = pair.reference[MIDDLE]
            row = {"pair": source, "noise_sigma": noise, "slices": "middle",
                   "size": list(pair.low.shape[1:]), "input": volume.quality(pair.low[MIDDLE], ref)}
            low01 = volume.minmax(pair.low)[MIDDLE]  # scaled as the whole slab, as RNST does
            for kind in ("nlm", "bm3d") if rnst.bm3d_available() else ("nlm",):
                t0 = time.time()
                d = np.stack([rnst.denoise(s, kind) for s in low01])
                row[kind], row[f"{kind}_seconds"] = volume.quality(d, ref), time.time() - t0
            q, wall, cpu = run_case(pair, model, backbone, preset, MIDDLE)
            row["rnst_fast_vgg16"], row["rnst_fast_vgg16_seconds"] = q, wall
            row["rnst_fast_vgg16_cpu_seconds"] = cpu
            rows.append(row)
            print(json.dumps(row), flush=True)
            save()
    key = ("patient2", 0.06)
    if key not in pair_cache:
        pair_cache[key] = pairs.make_pair(*key, seed=0)
    if args.keras_vgg16 and not have(*key, "middle", "rnst_fast_vgg16_keras"):
        row = dict(next(r for r in rows if (r["pair"], r["noise_sigma"]) == key))
        q, wall, cpu = run_case(pair_cache[key], caffe_model(args.keras_vgg16), nst.VGG16_CAFFE,
                                preset, MIDDLE)
        row = {k: v for k, v in row.items() if not k.startswith("rnst")}
        row.update({"rnst_fast_vgg16_keras": q, "rnst_fast_vgg16_keras_seconds": wall,
                    "rnst_fast_vgg16_keras_cpu_seconds": cpu})
        rows.append(row)
        print(json.dumps(row), flush=True)
        save()
    if args.skip_slab or have(*key, "all 3", "rnst_fast_vgg16"):
        print(table(rows))
        return
    pair = pair_cache[key]
    q, wall, cpu = run_case(pair, model, backbone, preset)
    row = {"pair": key[0], "noise_sigma": key[1], "slices": "all 3", "size": list(pair.low.shape[1:]),
           "input": volume.quality(pair.low, pair.reference),
           "rnst_fast_vgg16": q, "rnst_fast_vgg16_seconds": wall, "rnst_fast_vgg16_cpu_seconds": cpu}
    low01 = volume.minmax(pair.low)
    for kind in ("nlm", "bm3d") if rnst.bm3d_available() else ("nlm",):
        t0 = time.time()
        d = np.stack([rnst.denoise(s, kind) for s in low01])
        row[kind], row[f"{kind}_seconds"] = volume.quality(d, pair.reference), time.time() - t0
    rows.append(row)
    print(json.dumps(row), flush=True)
    save()
    print(table(rows))


METHODS = (("input", "input"), ("nlm", "NLM"), ("bm3d", "BM3D"),
           ("rnst_fast_vgg16", "RNST fast, VGG16 (torchvision)"),
           ("rnst_fast_vgg16_keras", "RNST fast, VGG16 (Keras/Caffe)"))


def table(rows) -> str:
    lines = ["| pair (slice size) | noise | slices | method | PSNR dB | SSIM | wall s | CPU s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for key, label in METHODS:
            if key not in r:
                continue
            (p, s), t, c = r[key], r.get(f"{key}_seconds"), r.get(f"{key}_cpu_seconds")
            best = [m for m, _ in METHODS[1:] if m in r]
            mark = lambda v, i: f"**{v}**" if max(r[m][i] for m in best) == r[key][i] and key != "input" else v
            lines.append(f"| {r['pair']} ({'x'.join(map(str, r['size']))}) | {r['noise_sigma']:.2f} | "
                         f"{r['slices']} | {label} | {mark(f'{p:.2f}', 0)} | {mark(f'{s:.3f}', 1)} | "
                         f"{'' if t is None else f'{t:.1f}'} | {'' if c is None else f'{c:.0f}'} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
