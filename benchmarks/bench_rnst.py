"""RNST against plain denoisers on held-out simulated low-field / high-field pairs
-> benchmarks/results/rnst.json and rnst.md (rewritten after every case).

Pairs (RNSTFieldTransferLib/pairs.py): 3-slice axial slabs at 1.5 mm of the MNI152 T1 and of
virtual patient 2 (styles: a deformed MNI, virtual patient 1002), Rician noise 0.03 / 0.06 / 0.10.
Held out: the denoiser and the presets were chosen on virtual patient 1 only
(benchmarks/rnst_denoisers.py, rnst_ablation.py).

Stage 1, every case, the middle slice (its neighbours are there for the 2.5D denoiser, as in a
volume): the input; non-local means (2D); BM3D (2D, the optional package); nlm-2.5d alone (the
default's start and its RED prior); RNST `fast` (the default); RNST `fast --prior style` (the
previous default: the published prior D = T_3).
Stage 2, the 0.06 cases: RNST `fast --denoiser bm3d`.
Stage 3, virtual patient 2 at 0.06, all 3 slices: RNST `fast` and `fast --prior style`, for the
time of a 3-slice slab and the through-plane error (volume.through_plane_error).
The `paper` preset is not run (20 x 1,800 evaluations: about 7 CPU hours per slice).

Metrics: volume.quality (each image min-max scaled; PSNR and SSIM over the slice and inside
the head of the reference). Times: wall seconds and the process's CPU seconds (all threads); the
2 cores are shared with other work, so wall times are upper bounds; the JSON records the load
average and the thread settings. Run on one core (as below), a wall time is what one core takes.

    OMP_NUM_THREADS=1 TF_NUM_INTRAOP_THREADS=1 TF_NUM_INTEROP_THREADS=1 \
        nice -n 10 .venv/bin/python benchmarks/bench_rnst.py [--resume]
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
STAGE2_NOISE = 0.06
SLAB_CASE = ("patient2", 0.06)
MIDDLE = 1

METHODS = (("input", "input"), ("nlm", "NLM (2D)"), ("bm3d", "BM3D (2D)"),
           ("nlm-2.5d", "NLM 2.5D (the default's start)"),
           ("rnst_fast", "RNST `fast` (default)"),
           ("rnst_fast_style", "RNST `fast --prior style` (previous default)"),
           ("rnst_fast_bm3d", "RNST `fast --denoiser bm3d`"))


def measured(fn):
    """(result, wall s, CPU s) of fn()."""
    t0, c0 = time.time(), time.process_time()
    out = fn()
    return out, time.time() - t0, time.process_time() - c0


def entry(q, wall=None, cpu=None):
    e = dict(q._asdict())
    if wall is not None:
        e.update(wall_s=wall, cpu_s=cpu)
    return e


def denoised(low01, kind, slices):
    """The denoiser alone on `slices` of the whole-slab-scaled low field (2.5D: with neighbours)."""
    n = len(low01)
    return np.stack([rnst.denoise(low01[s], kind, [low01[t] for t in (s - 1, s + 1) if 0 <= t < n]
                                  if kind == "nlm-2.5d" else ()) for s in slices])


def rnst_run(pair, model, backbone, overrides, slices):
    preset = rnst.get_preset("fast", **overrides)
    res, wall, cpu = measured(lambda: volume.transfer_volume(
        pair.low, pair.style, preset=preset, axis=0, slices=slices, model=model,
        backbone=backbone))
    return res.output[list(slices)], wall, cpu


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    ap.add_argument("--resume", action="store_true", help="keep the cases already in rnst.json")
    args = ap.parse_args(argv)
    model, backbone = nst.build_model("vgg16")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fast = rnst.get_preset("fast")
    meta = {"preset": {"name": fast.name, "outer_iterations": fast.outer_iterations,
                       "budgets": list(fast.budgets), "denoiser": fast.denoiser,
                       "prior": fast.prior},
            "threads": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "TF_NUM_INTRAOP_THREADS",
                                                       "TF_NUM_INTEROP_THREADS")},
            "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared)",
            "device": nst.compute_device(), "bm3d": rnst.bm3d_available()}
    rows = []
    if args.resume and (out / "rnst.json").is_file():
        rows = json.loads((out / "rnst.json").read_text())["rows"]

    def row_for(source, noise, slices):
        for r in rows:
            if (r["pair"], r["noise_sigma"], r["slices"]) == (source, noise, slices):
                return r
        r = {"pair": source, "noise_sigma": noise, "slices": slices, "methods": {}}
        rows.append(r)
        return r

    def save():
        meta["load_average"] = os.getloadavg()
        (out / "rnst.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        (out / "rnst.md").write_text(table(rows) + "\n" + summary(rows))

    cache = {}

    def pair_of(source, noise):
        if (source, noise) not in cache:
            cache[(source, noise)] = pairs.make_pair(source, noise, seed=0)
        return cache[(source, noise)]

    def baselines(row, pair, slices):
        ref = pair.reference[slices]
        low01 = volume.minmax(pair.low)  # scaled as the whole slab, as RNST does
        row["size"] = list(pair.low.shape[1:])
        m = row["methods"]
        m["input"] = entry(volume.quality(pair.low[slices], ref))
        for kind in ("nlm", "bm3d", "nlm-2.5d"):
            if kind == "bm3d" and not rnst.bm3d_available():
                continue
            d, wall, cpu = measured(lambda: denoised(low01, kind, slices))
            m[kind] = entry(volume.quality(d, ref), wall, cpu)
            if len(slices) > 1:
                m[kind]["through_plane"] = volume.through_plane_error(d, ref)
        if len(slices) > 1:
            m["input"]["through_plane"] = volume.through_plane_error(pair.low[slices], ref)

    def run(row, pair, slices, key, **overrides):
        if key in row["methods"]:
            return
        output, wall, cpu = rnst_run(pair, model, backbone, overrides, slices)
        ref = pair.reference[slices]
        row["methods"][key] = entry(volume.quality(output, ref), wall, cpu)
        if len(slices) > 1:
            row["methods"][key]["through_plane"] = volume.through_plane_error(output, ref)
        print(json.dumps({"pair": row["pair"], "noise": row["noise_sigma"], key: row["methods"][key]}),
              flush=True)
        save()

    for source in SOURCES:                                   # stage 1
        for noise in pairs.NOISE_LEVELS:
            pair = pair_of(source, noise)
            row = row_for(source, noise, "middle")
            if "input" not in row["methods"]:
                baselines(row, pair, [MIDDLE])
            run(row, pair, [MIDDLE], "rnst_fast")
            run(row, pair, [MIDDLE], "rnst_fast_style", prior="style")
    if rnst.bm3d_available():                                # stage 2
        for source in SOURCES:
            run(row_for(source, STAGE2_NOISE, "middle"), pair_of(source, STAGE2_NOISE), [MIDDLE],
                "rnst_fast_bm3d", denoiser="bm3d")
    pair = pair_of(*SLAB_CASE)                               # stage 3
    row = row_for(*SLAB_CASE, "all 3")
    everything = list(range(len(pair.low)))
    if "input" not in row["methods"]:
        baselines(row, pair, everything)
    run(row, pair, everything, "rnst_fast")
    run(row, pair, everything, "rnst_fast_style", prior="style")
    save()
    print(table(rows))
    print(summary(rows))


def summary(rows) -> str:
    """The default against BM3D, case by case: PSNR dB / SSIM over the slice; inside the head."""
    lines = ["| pair | noise | slices | BM3D | RNST `fast` (default) | default minus BM3D |",
             "|---|---|---|---|---|---|"]
    fields = ("psnr", "ssim", "psnr_head", "ssim_head")
    for r in rows:
        m = r["methods"]
        if "bm3d" not in m or "rnst_fast" not in m:
            continue
        b, d = m["bm3d"], m["rnst_fast"]
        diff = {f: d[f] - b[f] for f in fields}
        lines.append(f"| {r['pair']} | {r['noise_sigma']:.2f} | {r['slices']} | "
                     f"{b['psnr']:.2f} / {b['ssim']:.3f}; {b['psnr_head']:.2f} / {b['ssim_head']:.3f} | "
                     f"{d['psnr']:.2f} / {d['ssim']:.3f}; {d['psnr_head']:.2f} / {d['ssim_head']:.3f} | "
                     f"{diff['psnr']:+.2f} / {diff['ssim']:+.3f}; "
                     f"{diff['psnr_head']:+.2f} / {diff['ssim_head']:+.3f} |")
    return "\n".join(lines) + "\n"


def table(rows) -> str:
    lines = ["| pair (slice size) | noise | slices | method | PSNR dB: slice | SSIM: slice | "
             "PSNR dB: head | SSIM: head | through-plane error | wall s | CPU s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        m = r["methods"]
        best = {f: max(v[f] for k, v in m.items() if k != "input")
                for f in ("psnr", "ssim", "psnr_head", "ssim_head")}

        def cell(key, f, fmt):
            v = m[key][f]
            return f"**{v:{fmt}}**" if key != "input" and v == best[f] else f"{v:{fmt}}"

        for key, label in METHODS:
            if key not in m:
                continue
            e = m[key]
            tp = f"{e['through_plane']:.4f}" if "through_plane" in e else ""
            wall = f"{e['wall_s']:.1f}" if "wall_s" in e else ""
            cpu = f"{e['cpu_s']:.0f}" if "cpu_s" in e else ""
            lines.append(f"| {r['pair']} ({'x'.join(map(str, r['size']))}) | "
                         f"{r['noise_sigma']:.2f} | {r['slices']} | {label} | "
                         f"{cell(key, 'psnr', '.2f')} | {cell(key, 'ssim', '.3f')} | "
                         f"{cell(key, 'psnr_head', '.2f')} | {cell(key, 'ssim_head', '.3f')} | "
                         f"{tp} | {wall} | {cpu} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
