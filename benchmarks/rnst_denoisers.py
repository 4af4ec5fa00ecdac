"""Which denoiser starts RNST: candidates alone on the tuning pair (virtual patient 1, the middle
slice of its 3-slice slab, noise 0.03 / 0.06 / 0.10) -> benchmarks/results/rnst_denoisers.json
and rnst_denoisers.md.

Candidates: non-local means on the slice (the previous default, "nlm"); non-local means with
the neighbouring slices as channels (patch similarity over 3 slices, "nlm-2.5d") at a few h and
search windows; scikit-image's self-calibrated (J-invariant) wavelet, total-variation and NLM
denoisers (calibrate_denoiser, parameters chosen on the image itself); BM3D (optional package).
Metrics: volume.quality (PSNR and SSIM over the slice and inside the head). The held-out pairs
(MNI, virtual patient 2) are not looked at here.

    .venv/bin/python benchmarks/rnst_denoisers.py
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "OEFPredictor"))
sys.path.insert(0, str(REPO / "RNSTFieldTransfer"))

from RNSTFieldTransferLib import pairs, rnst, volume  # noqa: E402


def candidates(low01, s):
    """name -> function of nothing giving the denoised slice s."""
    from skimage.restoration import (calibrate_denoiser, denoise_nl_means,
                                     denoise_tv_chambolle, denoise_wavelet)
    x = low01[s]
    sigma = rnst.noise_sigma(x)
    stack = np.moveaxis(low01[s - 1:s + 2], 0, -1)[..., [1, 0, 2]]  # the slice first

    def nlm25(h, distance):
        return lambda: denoise_nl_means(stack, h=h * sigma, sigma=sigma, patch_size=5,
                                        patch_distance=distance, fast_mode=True,
                                        channel_axis=-1)[..., 0]

    def calibrated(fn, grid):
        return lambda: calibrate_denoiser(x, fn, grid)(x)

    out = {"nlm": lambda: rnst.denoise(x, "nlm"),
           "nlm-2.5d (default)": lambda: rnst.denoise(x, "nlm-2.5d", [low01[s - 1], low01[s + 1]])}
    for h in (0.7, 0.8, 0.9):
        for distance in (6, 11):
            out[f"nlm-2.5d h {h} sigma, search {distance}"] = nlm25(h, distance)
    out["J-invariant wavelet"] = calibrated(denoise_wavelet, {
        "sigma": list(np.linspace(0.5, 2, 7) * sigma), "wavelet": ["db2", "sym4"],
        "rescale_sigma": [True]})
    out["J-invariant TV"] = calibrated(denoise_tv_chambolle,
                                       {"weight": list(np.array([0.5, 1, 1.5, 2, 3]) * sigma)})
    out["J-invariant NLM"] = calibrated(denoise_nl_means, {
        "h": list(np.array([0.4, 0.6, 0.8, 1.0, 1.2]) * sigma), "sigma": [sigma],
        "patch_size": [5], "patch_distance": [6], "fast_mode": [True]})
    if rnst.bm3d_available():
        out["bm3d"] = lambda: rnst.denoise(x, "bm3d")
    return out


def main():
    rows = []
    for noise in pairs.NOISE_LEVELS:
        pair = pairs.make_pair("patient1", noise, seed=0)
        low01, ref = volume.minmax(pair.low), pair.reference[1]
        row = {"pair": "patient1", "noise_sigma": noise, "input": volume.quality(low01[1], ref)}
        for name, fn in candidates(low01, 1).items():
            t0 = time.process_time()
            image = fn()
            row[name] = volume.quality(image, ref) + (time.process_time() - t0,)
        rows.append(row)
        print(json.dumps(row), flush=True)
    out = REPO / "benchmarks" / "results"
    (out / "rnst_denoisers.json").write_text(json.dumps(rows, indent=1))
    lines = ["| denoiser | " + " | ".join(f"noise {r['noise_sigma']:.2f}" for r in rows) + " |",
             "|---" * (len(rows) + 1) + "|"]
    for name in rows[0]:
        if name in ("pair", "noise_sigma"):
            continue
        lines.append(f"| {name} | " + " | ".join(
            f"{r[name][0]:.2f} / {r[name][1]:.3f}; {r[name][2]:.2f} / {r[name][3]:.3f}"
            for r in rows) + " |")
    (out / "rnst_denoisers.md").write_text(
        "PSNR dB / SSIM over the slice; inside the head (virtual patient 1, middle slice)\n\n"
        + "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
