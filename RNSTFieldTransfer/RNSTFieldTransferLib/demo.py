"""Demo: the middle slice of a simulated low-field MNI152 slab (pairs.py) at three noise levels.

RNST against the reference, next to non-local means (and BM3D where the optional package is
installed): PSNR, SSIM and time per method, a figure, the NIfTI images.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

def run_demo(out_dir, *, preset, model, backbone, seed: int = 0, progress=None):
    import SimpleITK as sitk

    from .pairs import NOISE_LEVELS, make_pair
    from .rnst import bm3d_available, denoise
    from .volume import minmax, quality, transfer_volume

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows, panels = [], []
    for level, noise in enumerate(NOISE_LEVELS):
        pair = make_pair("mni", noise, seed=seed + level)
        low, ref, style = (a[1:2] for a in (pair.low, pair.reference, pair.style))

        def prog(f, text, level=level):
            if progress is not None:
                progress((level + f) / len(NOISE_LEVELS), f"noise {NOISE_LEVELS[level]}: {text}")

        t0 = time.time()
        # The whole slab goes in (the denoiser looks at the neighbouring slices); the middle
        # slice is transferred.
        res = transfer_volume(pair.low, pair.style, preset=preset, axis=0, slices=range(1, 2),
                              model=model, backbone=backbone, progress=prog)
        res.output = res.output[1:2]
        row = {"noise_sigma": noise, "preset": preset.name, "backbone": backbone.name,
               "denoiser": preset.denoiser, "outer_iterations": preset.outer_iterations,
               "budgets": list(preset.budgets), "rnst": quality(res.output, ref),
               "rnst_seconds": time.time() - t0, "input": quality(low, ref)}
        for kind in ("nlm", "bm3d") if bm3d_available() else ("nlm",):
            t0 = time.time()
            d = denoise(minmax(low[0]), kind)[None]
            row[kind], row[f"{kind}_seconds"] = quality(d, ref), time.time() - t0
        rows.append(row)
        panels.append((noise, low[0], res.output[0], ref[0], style[0], row))
        for name, arr in (("lowfield", low), ("rnst", res.output)):
            img = sitk.GetImageFromArray(arr.astype(np.float32))
            img.SetSpacing(pair.spacing)
            sitk.WriteImage(img, str(out / f"demo_noise{noise:.2f}_{name}.nii.gz"), True)
    (out / "rnst_demo_results.json").write_text(json.dumps(rows, indent=2))
    (out / "rnst_demo_results.md").write_text(results_table(rows))
    figure(panels, out / "rnst_demo.png", preset)
    print(results_table(rows))
    return rows


def results_table(rows) -> str:
    methods = [m for m in ("input", "nlm", "bm3d", "rnst") if m in rows[0]]
    lines = ["| noise sigma | " + " | ".join(f"{m} PSNR / SSIM: slice; head" for m in methods)
             + " | RNST s |",
             "|---" * (len(methods) + 2) + "|"]
    for r in rows:
        cells = [f"{r[m][0]:.2f} / {r[m][1]:.3f}; {r[m][2]:.2f} / {r[m][3]:.3f}" for m in methods]
        lines.append(f"| {r['noise_sigma']:.2f} | " + " | ".join(cells)
                     + f" | {r['rnst_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def figure(panels, path: Path, preset) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(len(panels), 4, figsize=(10, 2.9 * len(panels)))
    axes = np.atleast_2d(axes)
    for row, (noise, low, outp, ref, style, r) in zip(axes, panels):
        items = [(low, f"low-field, noise {noise:.2f}\nPSNR {r['input'][0]:.1f} dB, "
                       f"SSIM {r['input'][1]:.3f}"),
                 (outp, f"RNST ({preset.name})\nPSNR {r['rnst'][0]:.1f} dB, "
                        f"SSIM {r['rnst'][1]:.3f}"),
                 (ref, "high-field reference\n(metrics only)"),
                 (style, "style: another subject\n(deformed copy)")]
        for ax, (img, title) in zip(row, items):
            lo, hi = np.percentile(img, [0.5, 99.5])
            ax.imshow(img[::-1], cmap="gray", vmin=lo, vmax=hi)
            ax.set_title(title, fontsize=8)
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
