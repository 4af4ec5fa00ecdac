"""Simulated low-field / high-field pairs for the demo, the tests and the benchmark.

High field: the MNI ICBM152 2009a T1 shipped in the nilearn wheel, or a T1-weighted image of one
of OEFPredictor's virtual patients (its own anatomy: the templates under a random affine and
elastic deformation), both at 1.5 mm.
Low field, from the high-field slab: grey/white contrast flattened (blend with a 3-voxel Gaussian
smoothing: low fields lose T1 contrast), k-space cropped to the central half in-plane (lower
resolution, with its ringing), then complex Gaussian noise and the magnitude taken (Rician noise,
sigma a fraction of the maximum).
Style: a high-field slab of *another* subject: a randomly deformed copy of the MNI T1, or
another virtual patient, at the same physical height. The high-field slab of the same subject is
the reference, used only for PSNR/SSIM.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import RNSTInputError

VOXEL_MM = 1.5
NOISE_LEVELS = (0.03, 0.06, 0.10)   # Rician sigma, fraction of the image maximum
KSPACE_KEEP = 0.5                   # central fraction of k-space kept along each in-plane axis
FLATTEN = 0.45                      # weight of the smoothed copy in the contrast flattening
# T1-weighted intensities of the virtual patients' tissue labels (phantom.LABELS order).
T1W_BY_LABEL = {0: 0.0, 1: 0.62, 2: 1.0, 3: 0.70, 4: 0.74, 5: 0.15, 6: 0.55, 7: 0.45}


@dataclass
class Pair:
    name: str
    low: np.ndarray        # (slices, rows, cols) in [0, ~1]
    reference: np.ndarray  # high field, same subject and grid (metrics only)
    style: np.ndarray      # high field, another subject, same physical slices
    spacing: tuple         # mm (x, y, z)


def mni_t1_path() -> Path:
    import nilearn
    path = (Path(nilearn.__file__).parent / "datasets" / "data"
            / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")
    if not path.is_file():
        raise RNSTInputError(f"MNI152 T1 template not found in the nilearn wheel: {path}")
    return path


def mni_high_field(voxel_mm: float = VOXEL_MM) -> np.ndarray:
    """The MNI T1 resampled to `voxel_mm`, cropped to the head, scaled to [0, 1]; (z, y, x)."""
    import SimpleITK as sitk
    img = sitk.ReadImage(str(mni_t1_path()), sitk.sitkFloat32)
    size = [int(round(s * sp / voxel_mm)) for s, sp in zip(img.GetSize(), img.GetSpacing())]
    smooth = sitk.SmoothingRecursiveGaussian(img, voxel_mm / 2.5)  # anti-aliasing
    out = sitk.Resample(smooth, size, sitk.Transform(), sitk.sitkLinear, img.GetOrigin(),
                        [voxel_mm] * 3, img.GetDirection(), 0.0, sitk.sitkFloat32)
    return _crop_scale(sitk.GetArrayFromImage(out))


def patient_high_field(seed: int, voxel_mm: float = VOXEL_MM) -> np.ndarray:
    """T1-weighted image of virtual patient `seed` (OEFPredictorLib.phantom), (z, y, x)."""
    try:
        from OEFPredictorLib import phantom
    except ImportError as exc:
        raise RNSTInputError("virtual patients need OEFPredictorLib on the Python path") from exc
    from scipy import ndimage
    patient = phantom.make_patient(seed, phantom.PatientConfig(voxel_size=voxel_mm,
                                                               lesions=False))
    lut = np.zeros(256, np.float32)
    for label, value in T1W_BY_LABEL.items():
        lut[label] = value
    t1w = lut[patient.labels] * (patient.params["S0"] / max(np.median(
        patient.params["S0"][patient.mask]), 1e-6))  # S0 carries the smooth coil bias
    return _crop_scale(ndimage.gaussian_filter(t1w, 0.7))  # partial volume at borders


def _crop_scale(volume: np.ndarray) -> np.ndarray:
    v = np.clip(np.asarray(volume, np.float64), 0, None)
    inside = np.argwhere(v > 0.05 * v.max())
    lo, hi = inside.min(0), inside.max(0) + 1
    m = 7  # voxels of background around the head, as a scan has
    v = v[lo[0]:hi[0], max(lo[1] - m, 0):hi[1] + m, max(lo[2] - m, 0):hi[2] + m]
    return v / v.max()


def simulate_low_field(high: np.ndarray, noise: float, rng) -> np.ndarray:
    """Contrast flattening, k-space crop (in-plane), Rician noise; slices along axis 0."""
    from scipy import ndimage
    flat = (1 - FLATTEN) * high + FLATTEN * ndimage.gaussian_filter(high, 3.0)
    k = np.fft.fftshift(np.fft.fft2(flat, axes=(1, 2)), axes=(1, 2))
    rows, cols = high.shape[1:]
    keep = np.zeros((rows, cols), bool)
    kr, kc = int(rows * KSPACE_KEEP / 2), int(cols * KSPACE_KEEP / 2)
    keep[rows // 2 - kr:rows // 2 + kr, cols // 2 - kc:cols // 2 + kc] = True
    image = np.fft.ifft2(np.fft.ifftshift(k * keep, axes=(1, 2)), axes=(1, 2))
    image = image + rng.normal(0, noise, high.shape) + 1j * rng.normal(0, noise, high.shape)
    return np.abs(image)


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


def _slab(volume: np.ndarray, centre_fraction: float, n: int) -> np.ndarray:
    z0 = int(round(centre_fraction * volume.shape[0])) - n // 2
    return volume[z0:z0 + n]


def make_pair(source: str, noise: float, seed: int = 0, n_slices: int = 3,
              height: float = 0.62) -> Pair:
    """`source`: "mni" or "patientN" (virtual patient N; the style is patient N + 1000).
    `height`: the slab's centre as a fraction of the head's height (0.62: above the ventricles)."""
    rng = np.random.default_rng(seed)
    if source == "mni":
        high = mni_high_field()
        other = deformed_copy(high, rng)
    elif source.startswith("patient"):
        index = int(source[len("patient"):])
        high = patient_high_field(index)
        other = patient_high_field(index + 1000)
    else:
        raise RNSTInputError(f"unknown pair source {source!r}: mni or patientN")
    ref = _slab(high, height, n_slices)
    style = _slab(other, height, n_slices)
    low = simulate_low_field(ref, noise, rng)
    return Pair(f"{source} sigma {noise:.2f}", low.astype(np.float32),
                ref.astype(np.float32), style.astype(np.float32), (VOXEL_MM,) * 3)
