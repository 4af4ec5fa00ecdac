"""RNST variants on the middle slice of one pair: what D (the RED prior) should be, and other
levers tried against it -> appends one JSON line per run to benchmarks/results/rnst_prior.jsonl.

    .venv/bin/python benchmarks/rnst_prior.py SOURCE NOISE NAME [key=value ...]
    .venv/bin/python benchmarks/rnst_prior.py SOURCE NOISE baselines   (input, nlm-2.5d, BM3D)

SOURCE: mni, patient1 (tuning), patient2; NOISE: 0.03, 0.06, 0.10. Options (one change at a time
from `fast`):
  D=T3|start         the RED prior: the style transfer's T3 (published) or the denoised start
  stylehist=1        the style slice's histogram matched to the (scaled) denoised start
  anchor=start       the content target is the denoised start instead of the noisy x0
  lam=, budgets=A,B,C, sw= (style weight), denoiser=
Each line also holds the output projected onto the discrepancy ball ||x - x0|| <= sigma sqrt(N)
(sigma by rnst.noise_sigma), when it lies outside. This script re-implements the one-iteration
loop of rnst.rnst_slices so that the variants that were not kept can be run; with D=start it
is `fast` (within 0.02 dB and 0.002 SSIM of benchmarks/results/rnst.md, run to run).
"""
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "OEFPredictor"))
sys.path.insert(0, str(REPO / "RNSTFieldTransfer"))
from RNSTFieldTransferLib import nst, pairs, rnst, volume  # noqa: E402


def project_discrepancy(out, x0):
    """The nearest image to `out` with ||x - x0|| <= sigma sqrt(N); None if out is inside."""
    bound = rnst.noise_sigma(x0) * np.sqrt(x0.size)
    r = float(np.linalg.norm(out - x0))
    return (None if r <= bound else x0 + (out - x0) * bound / r), r / bound


def write(rec):
    print(json.dumps(rec), flush=True)
    with open(REPO / "benchmarks" / "results" / "rnst_prior.jsonl", "a") as f:
        f.write(json.dumps(rec) + "\n")


def baselines(source, noise):
    """The middle slice alone: input, nlm-2.5d (the default's start and D), BM3D if installed."""
    pair = pairs.make_pair(source, noise, seed=0)
    low01 = volume.minmax(pair.low)
    ref = pair.reference[1]

    def q(a):
        return [round(v, 3) for v in volume.quality(a, ref)]

    rec = {"case": f"{source} {noise}", "variant": "baselines", "input": q(low01[1]),
           "nlm-2.5d": q(rnst.denoise(low01[1], "nlm-2.5d", [low01[0], low01[2]]))}
    if rnst.bm3d_available():
        rec["bm3d"] = q(rnst.denoise(low01[1], "bm3d"))
    write(rec)


def main(argv):
    source, noise, name = argv[0], float(argv[1]), argv[2]
    if name == "baselines":
        return baselines(source, noise)
    opts = dict(a.split("=") for a in argv[3:])
    anchor = opts.get("anchor", "x0")
    stylehist = opts.get("stylehist", "0") == "1"
    lam = float(opts.get("lam", 0.7))
    dmode = opts.get("D", "T3")
    budgets = tuple(int(b) for b in opts.get("budgets", "40,40,40").split(","))
    sw = float(opts.get("sw", nst.STYLE_WEIGHT))
    denoiser = opts.get("denoiser", "nlm-2.5d")

    pair = pairs.make_pair(source, noise, seed=0)
    low01 = volume.minmax(pair.low).astype(np.float32)
    s01 = volume.minmax(pair.style).astype(np.float32)
    content, style, ref = low01[1], s01[1], pair.reference[1]
    model, backbone = nst.build_model("vgg16")
    if sw != nst.STYLE_WEIGHT:
        import dataclasses
        backbone = dataclasses.replace(backbone, style_weight=sw)
    t0, c0 = time.time(), time.process_time()
    lo, hi = float(content.min()), float(content.max())

    def scaled(a):
        return lo + (hi - lo) * volume.minmax(a)

    x = content.astype(np.float64)
    start = rnst.denoise(x, denoiser, [low01[0], low01[2]] if denoiser == "nlm-2.5d" else ())
    target = content if anchor == "x0" else scaled(start).astype(np.float32)
    if stylehist:
        from skimage.exposure import match_histograms
        style = match_histograms(style, scaled(start)).astype(np.float32)
    problem = nst.StyleTransfer(model, target, style, backbone)
    res = problem.run(scaled(start).astype(np.float32), budgets)
    t = [im.astype(np.float64) for im in res.images]
    d = t[-1] if dmode == "T3" else scaled(start)
    cands, losses = [], []
    for k in (1, 2, 3, 4, 5):
        for tj in t:
            c = x - 0.15 * k * ((x - tj) + lam * (x - d))
            cands.append(c)
            losses.append(problem.loss(scaled(c).astype(np.float32)))
    out = np.clip(cands[int(np.argmin(losses))], 0, 1)
    wall, cpu = time.time() - t0, time.process_time() - c0

    def q(a):
        return [round(v, 3) for v in volume.quality(a, ref)]

    projected, ratio = project_discrepancy(out, x)
    rec = {"case": f"{source} {noise}", "variant": name, "opts": opts, "out": q(out),
           "T3": q(t[-1]), "start": q(start), "input": q(content), "wall": round(wall),
           "cpu": round(cpu), "pick": int(np.argmin(losses)),
           "residual_over_sigma_sqrtN": round(ratio, 2),
           "projected": None if projected is None else q(projected)}
    write(rec)


if __name__ == "__main__":
    main(sys.argv[1:])
