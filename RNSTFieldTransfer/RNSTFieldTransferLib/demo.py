"""Demo: a simulated low-field scan made from the MNI152 T1 (shipped in the nilearn wheel).

High-field = the MNI ICBM152 2009a T1 at 2.5 mm (the reference, used only for PSNR/SSIM).
Low-field = the same image with flattened tissue contrast (blend with a smoothed copy: low fields
lose grey/white contrast), a blur (lower resolution) and Rician noise at three levels.
Style = a randomly deformed copy of the high-field image (affine + smooth elastic), taken a few
slices away: another "subject", never the reference itself.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from .errors import RNSTInputError

NOISE_LEVELS = (0.03, 0.06, 0.10)  # Rician sigma, fraction of the image maximum
VOXEL_MM = 2.5
STYLE_SLICE_OFFSET = 4           # style slices lie 4 slices (10 mm) above the content slices


def mni_t1_path() -> Path:
    import nilearn
    path = (Path(nilearn.__file__).parent / "datasets" / "data"
            / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")
    if not path.is_file():
        raise RNSTInputError(f"MNI152 T1 template not found in the nilearn wheel: {path}")
    return path


def load_high_field(voxel_mm: float = VOXEL_MM):
    """The MNI T1 resampled to `voxel_mm` isotropic, scaled to [0, 1]: (sitk image, array)."""
    import SimpleITK as sitk
    img = sitk.ReadImage(str(mni_t1_path()), sitk.sitkFloat32)
    size = [int(round(s * sp / voxel_mm)) for s, sp in zip(img.GetSize(), img.GetSpacing())]
    smooth = sitk.SmoothingRecursiveGaussian(img, voxel_mm / 2.5)  # anti-aliasing
    out = sitk.Resample(smooth, size, sitk.Transform(), sitk.sitkLinear, img.GetOrigin(),
                        [voxel_mm] * 3, img.GetDirection(), 0.0, sitk.sitkFloat32)
    arr = sitk.GetArrayFromImage(out).astype(np.float64)
    arr = np.clip(arr, 0, None)
    arr /= arr.max()
    out = sitk.GetImageFromArray(arr.astype(np.float32))
    out.SetSpacing([voxel_mm] * 3)
    out.SetOrigin(img.GetOrigin())
    out.SetDirection(img.GetDirection())
    return out, arr


def simulate_low_field(high: np.ndarray, noise: float, rng) -> np.ndarray:
    from scipy import ndimage
    flat = 0.55 * high + 0.45 * ndimage.gaussian_filter(high, 3.0)  # grey/white contrast down
    blurred = ndimage.gaussian_filter(flat, 0.8)
    real = blurred + rng.normal(0.0, noise, high.shape)
    imag = rng.normal(0.0, noise, high.shape)
    return np.sqrt(real ** 2 + imag ** 2)  # magnitude image: Rician noise


def deformed_copy(high: np.ndarray, rng) -> np.ndarray:
    """Another 'subject': 6 % scaling, 5 degree rotation, smooth elastic field (~2 voxels)."""
    from scipy import ndimage
    shape = np.array(high.shape)
    angle = np.deg2rad(5.0)
    rot = np.array([[1, 0, 0], [0, np.cos(angle), -np.sin(angle)],
                    [0, np.sin(angle), np.cos(angle)]])
    matrix = rot @ np.diag([1.0, 0.94, 1.06])
    centre = (shape - 1) / 2
    grid = np.indices(high.shape).reshape(3, -1).astype(float)
    coords = matrix @ (grid - centre[:, None]) + centre[:, None]
    for d in range(3):
        field = ndimage.gaussian_filter(rng.normal(0, 1, high.shape), 6.0)
        coords[d] += (field / (np.abs(field).max() + 1e-12) * 2.0).ravel()
    return ndimage.map_coordinates(high, coords, order=1, mode="constant").reshape(high.shape)


def run_demo(out_dir, *, preset, weights, n_slices: int = 2, seed: int = 0, progress=None):
    import SimpleITK as sitk

    from .nst import build_vgg16_features
    from .rnst import denoise
    from .volume import quality, transfer_volume

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    image, high = load_high_field()
    style_volume = deformed_copy(high, rng)
    centre = high.shape[0] // 2 + 6  # axial slices just above the lateral ventricles
    zs = list(range(centre, centre + 3 * n_slices, 3))[:n_slices]
    ref = high[zs]
    style = style_volume[[z + STYLE_SLICE_OFFSET for z in zs]]
    model = build_vgg16_features(weights)

    rows = []
    panels = []
    for level, noise in enumerate(NOISE_LEVELS):
        low = simulate_low_field(high, noise, rng)[zs]
        t0 = time.time()

        def prog(f, text, level=level):
            if progress is not None:
                progress((level + f) / len(NOISE_LEVELS), f"noise {NOISE_LEVELS[level]}: {text}")

        res = transfer_volume(low, style, preset=preset, axis=0, model=model, progress=prog)
        seconds = time.time() - t0
        p_in, s_in = quality(low, ref)
        p_out, s_out = quality(res.output, ref)
        # The denoiser D alone, for comparison: what the style transfer adds on top of it.
        p_d, s_d = quality(np.stack([denoise(s, preset.denoiser) for s in low]), ref)
        rows.append({"noise_sigma": noise, "slices": zs, "psnr_input": p_in, "psnr_output": p_out,
                     "ssim_input": s_in, "ssim_output": s_out, "psnr_denoiser_only": p_d,
                     "ssim_denoiser_only": s_d, "seconds": seconds, "preset": preset.name,
                     "outer_iterations": preset.outer_iterations,
                     "budgets": list(preset.budgets)})
        panels.append((noise, low[0], res.output[0], ref[0], style[0],
                       (p_in, s_in), (p_out, s_out)))
        for name, arr in (("lowfield", low), ("rnst", res.output)):
            img = sitk.GetImageFromArray(arr.astype(np.float32))
            img.SetSpacing(image.GetSpacing())
            sitk.WriteImage(img, str(out / f"demo_noise{noise:.2f}_{name}.nii.gz"), True)
    for name, arr in (("reference", ref), ("style", style)):
        img = sitk.GetImageFromArray(arr.astype(np.float32))
        img.SetSpacing(image.GetSpacing())
        sitk.WriteImage(img, str(out / f"demo_{name}.nii.gz"), True)

    (out / "rnst_demo_results.json").write_text(json.dumps(rows, indent=2))
    (out / "rnst_demo_results.md").write_text(results_table(rows))
    figure(panels, out / "rnst_demo.png", preset)
    print(results_table(rows))
    return rows


def results_table(rows) -> str:
    lines = ["| noise sigma | PSNR input (dB) | PSNR RNST (dB) | gain | SSIM input | SSIM RNST |"
             " gain | denoiser alone PSNR / SSIM | time (s) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['noise_sigma']:.2f} | {r['psnr_input']:.2f} | {r['psnr_output']:.2f} | "
            f"{r['psnr_output'] - r['psnr_input']:+.2f} | {r['ssim_input']:.3f} | "
            f"{r['ssim_output']:.3f} | {r['ssim_output'] - r['ssim_input']:+.3f} | "
            f"{r['psnr_denoiser_only']:.2f} / {r['ssim_denoiser_only']:.3f} | {r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def figure(panels, path: Path, preset) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(len(panels), 4, figsize=(10, 2.9 * len(panels)))
    axes = np.atleast_2d(axes)
    for row, (noise, low, outp, ref, style, q_in, q_out) in zip(axes, panels):
        items = [(low, f"low-field, noise {noise:.2f}\nPSNR {q_in[0]:.1f} dB, SSIM {q_in[1]:.3f}"),
                 (outp, f"RNST ({preset.name})\nPSNR {q_out[0]:.1f} dB, SSIM {q_out[1]:.3f}"),
                 (ref, "high-field reference\n(metrics only)"),
                 (style, "style: deformed copy,\n10 mm away")]
        for ax, (img, title) in zip(row, items):
            lo, hi = np.percentile(img, [0.5, 99.5])
            ax.imshow(img[::-1], cmap="gray", vmin=lo, vmax=hi)  # superior up... anterior up
            ax.set_title(title, fontsize=8)
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
