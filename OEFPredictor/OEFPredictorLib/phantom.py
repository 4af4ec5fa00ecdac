"""Virtual patients: QQ parameter maps on real brain anatomy.

Anatomy comes from the MNI ICBM 2009a symmetric templates (T1, GM and WM probability maps) that
the nilearn wheel ships (no download; (c) 1993-2009 Louis Collins, McConnell Brain Imaging Centre,
Montreal Neurological Institute, McGill University; see docs/ATTRIBUTION.md). Each patient gets:

- its own anatomy: a random affine (rotation, anisotropic scale, shift) plus a smooth elastic
  deformation of the templates;
- tissue fractions: cortical GM, WM, deep GM, iron-rich deep GM (pallidum, substantia nigra, red
  nucleus), CSF;
- smooth random parameter fields per tissue around the priors of physics.md, blended by the tissue
  fractions at borders, so that every voxel's signal is exactly the forward model of its truth;
- optionally lesions (misery perfusion: high OEF; infarct core: low OEF) as spheres or blobs,
  with their contralateral mirror regions for contrast measurements;
- or, with `PatientConfig.stroke()`, stroke-like patients for spatial learners: several lesions of
  both kinds (misery perfusion with OEF and v up, infarct core with OEF down, cores nested in
  penumbrae), 3-25 mm, spheres, blobs, wedges and cortical vascular-territory ribbons, soft or hard
  edges, and (`wide_priors`) tissue means, within-tissue spread and field smoothness drawn per
  patient from wide ranges, so that a learner learns the physics rather than one prior;
- optionally a share of voxels whose parameters are drawn independently of the tissue, uniform
  within the hard bounds, so that learners learn the physics rather than the anatomy.

Arrays are in SimpleITK order (z, y, x); geometry in LPS like SimpleITK.
"""
from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import numpy as np
from scipy import ndimage, special

from . import physics
from .io import Geometry

# Label values of the tissue/lesion map (also written as a BIDS dseg.tsv).
LABELS = {
    0: "background",
    1: "cortical_GM",
    2: "WM",
    3: "deep_GM",
    4: "iron_rich_deep_GM",
    5: "CSF",
    6: "lesion_misery_perfusion",
    7: "lesion_infarct_core",
}
CSF_LABEL = 5
LESION_LABELS = {"misery": 6, "infarct": 7}
# Lesion map: the lesions and their contralateral mirror regions.
LESION_MAP_LABELS = {0: "none", 1: "misery_perfusion", 2: "infarct_core",
                     3: "contralateral_misery_perfusion", 4: "contralateral_infarct_core"}

TISSUES = ("cortical_GM", "WM", "deep_GM", "iron_rich_deep_GM", "CSF")

# Tissue priors (physics.md): (mean, sd, lo, hi) of truncated normals; S0 relative.
TISSUE_PRIORS = {
    "cortical_GM": {"Y": (0.58, 0.05, 0.35, 0.80), "v": (0.035, 0.008, 0.01, 0.06),
                    "R2": (14.0, 2.0, 8.0, 20.0), "chi_nb": (-0.030, 0.015, -0.08, 0.02), "S0": 0.85},
    "WM": {"Y": (0.57, 0.05, 0.35, 0.80), "v": (0.025, 0.006, 0.008, 0.045),
           "R2": (17.0, 2.0, 11.0, 23.0), "chi_nb": (-0.040, 0.015, -0.09, 0.01), "S0": 0.70},
    "deep_GM": {"Y": (0.58, 0.05, 0.35, 0.80), "v": (0.030, 0.008, 0.01, 0.055),
                "R2": (24.0, 2.5, 20.0, 28.0), "chi_nb": (0.06, 0.025, 0.02, 0.10), "S0": 0.80},
    "iron_rich_deep_GM": {"Y": (0.58, 0.05, 0.35, 0.80), "v": (0.025, 0.008, 0.008, 0.05),
                          "R2": (35.0, 3.0, 30.0, 40.0), "chi_nb": (0.15, 0.03, 0.10, 0.20), "S0": 0.70},
    "CSF": {"Y": (0.60, 0.0, 0.60, 0.60), "v": (0.001, 0.0, 0.001, 0.001),
            "R2": (1.5, 0.3, 1.0, 2.0), "chi_nb": (0.0, 0.002, -0.005, 0.005), "S0": 1.00},
}
# Lesion parameter ranges (physics.md).
MISERY_Y, MISERY_V = (0.20, 0.45), (0.02, 0.05)
INFARCT_Y, INFARCT_V, INFARCT_R2_DROP, INFARCT_S0_FACTOR = (0.75, 0.92), (0.01, 0.03), (2.0, 5.0), 1.05
# Stroke-like lesions: wider Y ranges, blood volume relative to the host tissue (misery perfusion
# dilates vessels: v up; an infarct core loses them), and penumbrae around some cores.
STROKE_MISERY_Y, STROKE_MISERY_V_FACTOR = (0.18, 0.50), (1.1, 1.7)
STROKE_INFARCT_Y, STROKE_INFARCT_V_FACTOR = (0.72, 0.95), (0.4, 1.0)
NESTED_CORE_PROBABILITY = 0.3
LESION_SHAPES = ("sphere", "blob", "wedge", "territory")

# MNI boxes (RAS mm) of the deep grey nuclei; the iron-rich ones are a subset.
_DEEP_GM_BOX = ((-34, 34), (-40, 28), (-12, 28))
_IRON_BOXES = (((12, 24), (-12, 6), (-8, 5)), ((-24, -12), (-12, 6), (-8, 5)),  # globus pallidus
               ((3, 14), (-28, -10), (-20, -4)), ((-14, -3), (-28, -10), (-20, -4)))  # SN / RN


@dataclasses.dataclass
class PatientConfig:
    """How one virtual patient is drawn. Defaults give a plausible adult brain."""

    voxel_size: float = 1.0  # mm, isotropic
    lesions: bool | None = None  # None: drawn at random (60 % of patients)
    independent_fraction: float = 0.0  # share of brain voxels with tissue-independent parameters
    rotation_deg: float = 6.0
    scale_range: float = 0.08
    shift_mm: float = 4.0
    elastic_mm: float = 3.0  # displacement amplitude of the elastic deformation
    field_correlation_mm: float = 12.0  # correlation length of within-tissue parameter variation
    s0_scale: float = 1000.0  # signal units of S0 = 1 (relative)
    coil_bias: float = 0.15  # peak-to-peak-ish amplitude of the smooth receive-field variation
    # Stroke-like lesions (see stroke()); None keeps the original lesion model (1-2 spheres/blobs).
    lesion_count: tuple[int, int] | None = None  # inclusive range of lesions per patient
    lesion_shapes: tuple[str, ...] = ("sphere", "blob")
    lesion_size_mm: tuple[float, float] = (10.0, 30.0)  # extent (diameter) range
    wide_priors: bool = False  # tissue means, spreads and field smoothness drawn per patient
    tissue_priors: dict | None = None  # replaces TISSUE_PRIORS (held-out tests of other priors)

    @classmethod
    def stroke(cls, voxel_size: float = 2.0, wide_priors: bool = False, lesions: bool | None = True,
               **overrides) -> "PatientConfig":
        """Stroke-like patients: 2-6 lesions of both kinds and all shapes, 3-25 mm."""
        settings = dict(lesion_count=(2, 6), lesion_shapes=LESION_SHAPES, lesion_size_mm=(3.0, 25.0))
        return cls(voxel_size=voxel_size, lesions=lesions, wide_priors=wide_priors, **{**settings, **overrides})


@dataclasses.dataclass
class VirtualPatient:
    """Truth maps (z, y, x) of one virtual patient, and where they live in space."""

    params: dict[str, np.ndarray]  # S0 (a.u.), R2 (Hz), Y, v, chi_nb (ppm); 0 outside the mask
    mask: np.ndarray  # bool brain mask (CSF inside the brain included)
    labels: np.ndarray  # uint8, see LABELS
    lesion_map: np.ndarray  # uint8, see LESION_MAP_LABELS
    geometry: Geometry
    lesions: list[dict]

    @property
    def oef_percent(self) -> np.ndarray:
        return np.where(self.mask, 100.0 * physics.oef_from_Y(self.params["Y"]), 0.0)

    @property
    def metric_mask(self) -> np.ndarray:
        """Where accuracy is measured: the brain without CSF."""
        return self.mask & (self.labels != CSF_LABEL)


# --- Templates --------------------------------------------------------------------------------
def template_dir() -> Path:
    import nilearn.datasets  # only for the location of its bundled data files

    return Path(nilearn.datasets.__file__).parent / "data"


@functools.lru_cache(maxsize=1)
def _templates():
    """Template tissue fractions, cropped to the head, and the template's geometry.

    Returns (fractions[5, z, y, x] float32 in TISSUES order, brain mask, Geometry of the crop,
    RAS coordinates helper). Cached: every patient starts from the same anatomy.
    """
    import SimpleITK as sitk

    d = template_dir()
    read = lambda name: sitk.ReadImage(str(d / f"mni_icbm152_{name}_tal_nlin_sym_09a_converted.nii.gz"))
    gm_img = read("gm")
    gm = sitk.GetArrayFromImage(gm_img).astype(np.float32) / 255.0
    wm = sitk.GetArrayFromImage(read("wm")).astype(np.float32) / 255.0
    t1 = sitk.GetArrayFromImage(read("t1")).astype(np.float32)
    brain = (t1 > 0.15 * t1.max()) | (gm + wm > 0.2)
    brain = ndimage.binary_closing(brain, iterations=2)
    brain = ndimage.binary_fill_holes(brain)
    brain = ndimage.binary_opening(brain, iterations=1)
    tissue = np.clip(gm + wm, 0, 1)
    gm = np.where(brain, gm, 0) / np.maximum(tissue, 1).astype(np.float32)
    wm = np.where(brain, wm, 0) / np.maximum(tissue, 1).astype(np.float32)
    csf = np.where(brain, 1.0 - gm - wm, 0).astype(np.float32)

    # RAS mm of every template voxel (direction is diag(-1, -1, 1) in LPS).
    origin, spacing = np.array(gm_img.GetOrigin()), np.array(gm_img.GetSpacing())
    k, j, i = np.indices(gm.shape, dtype=np.float32)
    ras_x = -(origin[0] - i * spacing[0])
    ras_y = -(origin[1] - j * spacing[1])
    ras_z = origin[2] + k * spacing[2]

    def in_box(box):
        (x0, x1), (y0, y1), (z0, z1) = box
        return (ras_x > x0) & (ras_x < x1) & (ras_y > y0) & (ras_y < y1) & (ras_z > z0) & (ras_z < z1)

    depth = ndimage.distance_transform_edt(brain, sampling=spacing[::-1])
    deep = in_box(_DEEP_GM_BOX) & (depth > 15.0)
    iron = np.zeros_like(deep)
    for box in _IRON_BOXES:
        iron |= in_box(box)
    iron &= brain

    f_iron = np.where(iron, gm + wm, 0)
    f_deep = np.where(deep & ~iron, gm, 0)
    f_cort = np.where(deep | iron, 0, gm)
    f_wm = np.where(iron, 0, wm)
    fractions = np.stack([f_cort, f_wm, f_deep, f_iron, csf]).astype(np.float32)

    # Crop to the brain with a margin that leaves room for the random affine.
    zz, yy, xx = np.nonzero(brain)
    margin = 14
    lo = np.maximum([zz.min() - margin, yy.min() - margin, xx.min() - margin], 0)
    hi = np.minimum([zz.max() + margin + 1, yy.max() + margin + 1, xx.max() + margin + 1], brain.shape)
    crop = tuple(slice(a, b) for a, b in zip(lo, hi))
    direction = np.array(gm_img.GetDirection()).reshape(3, 3)
    crop_origin = origin + direction @ (np.array([lo[2], lo[1], lo[0]]) * spacing)
    geometry = Geometry(tuple(spacing), tuple(crop_origin), tuple(direction.ravel()))
    midline_x_index = (origin[0] / spacing[0]) - lo[2]  # template index (x) of RAS x = 0, in the crop
    return fractions[(slice(None),) + crop], brain[crop], geometry, float(midline_x_index)


# --- Random fields ----------------------------------------------------------------------------
def smooth_field(rng: np.random.Generator, shape, correlation_vox: float) -> np.ndarray:
    """Zero-mean, unit-SD Gaussian random field with the given correlation length (voxels).

    Drawn on a coarse grid and interpolated up (separable linear interpolation as three small
    matrix products: much faster than ndimage.zoom on a whole 1 mm brain).
    """
    factor = max(1, int(correlation_vox // 3))
    coarse_shape = tuple(max(2, int(np.ceil(s / factor)) + 1) for s in shape)
    noise = ndimage.gaussian_filter(rng.standard_normal(coarse_shape), correlation_vox / factor / 2,
                                    mode="wrap")
    noise = ((noise - noise.mean()) / (noise.std() + 1e-12)).astype(np.float32)
    mz, my, mx = (_linear_interpolation_matrix(n, c) for n, c in zip(shape, coarse_shape))
    field = np.tensordot(mz, noise, (1, 0))  # (z, cy, cx)
    field = np.tensordot(field, my, (1, 1))  # (z, cx, y)
    return np.tensordot(field, mx, (1, 1))  # (z, y, x)


def _linear_interpolation_matrix(n_fine: int, n_coarse: int) -> np.ndarray:
    """(n_fine, n_coarse) weights of linear interpolation from a coarse grid spanning the fine one."""
    position = np.linspace(0.0, n_coarse - 1.0, n_fine)
    lower = np.minimum(np.floor(position).astype(int), n_coarse - 2)
    weight = (position - lower).astype(np.float32)
    matrix = np.zeros((n_fine, n_coarse), dtype=np.float32)
    rows = np.arange(n_fine)
    matrix[rows, lower] = 1.0 - weight
    matrix[rows, lower + 1] = weight
    return matrix


def _truncated(mean, sd, lo, hi, z):
    return np.clip(mean + sd * z, lo, hi)


# --- Patients ---------------------------------------------------------------------------------
def make_patient(seed: int | np.random.SeedSequence, config: PatientConfig | None = None) -> VirtualPatient:
    """Draw one virtual patient. The same seed and config give identical maps."""
    config = config or PatientConfig()
    if config.voxel_size <= 0 or config.voxel_size > 8:
        raise ValueError(f"Voxel size {config.voxel_size} mm is not usable; use 0.5-8 mm.")
    if not 0.0 <= config.independent_fraction <= 1.0:
        raise ValueError("independent_fraction must lie between 0 and 1.")
    rng = np.random.default_rng(seed)
    fractions_t, brain_t, geom_t, midline_i = _templates()
    t_shape = np.array(brain_t.shape)
    t_spacing = np.array(geom_t.spacing)[::-1]  # z, y, x

    # Output grid: the template crop's physical extent at the requested voxel size.
    vs = float(config.voxel_size)
    out_shape = tuple(int(np.floor((n - 1) * s / vs)) + 1 for n, s in zip(t_shape, t_spacing))
    geometry = Geometry((vs, vs, vs), geom_t.origin, geom_t.direction)

    # Patient -> template mapping: random affine about the centre, plus elastic displacement.
    centre = (t_shape - 1) * t_spacing / 2.0
    angles = np.deg2rad(rng.uniform(-config.rotation_deg, config.rotation_deg, 3))
    rot = _rotation(angles)
    scale = 1.0 + rng.uniform(-config.scale_range, config.scale_range, 3)
    shift = rng.uniform(-config.shift_mm, config.shift_mm, 3)
    inverse = np.linalg.inv(rot @ np.diag(scale))
    grid_mm = [np.arange(n, dtype=np.float32) * vs for n in out_shape]
    corr = 25.0 / vs
    coords = np.empty((3,) + out_shape, dtype=np.float32)
    for axis in range(3):
        # template mm = inverse @ (p - centre - shift) + centre + elastic
        acc = np.full(out_shape, centre[axis], dtype=np.float32)
        for other in range(3):
            shape = [1, 1, 1]
            shape[other] = out_shape[other]
            acc += inverse[axis, other] * (grid_mm[other] - centre[other] - shift[other]).reshape(shape)
        acc += config.elastic_mm * smooth_field(rng, out_shape, corr)
        coords[axis] = acc / t_spacing[axis]

    brain = ndimage.map_coordinates(brain_t.astype(np.float32), coords, order=1, mode="constant") > 0.5
    # Tissue fractions are sampled only inside the brain (a third of the grid): faster.
    inside = coords[:, brain]
    fractions = np.zeros((len(fractions_t),) + out_shape, dtype=np.float32)
    for t, f in enumerate(fractions_t):
        fractions[t][brain] = np.clip(ndimage.map_coordinates(f, inside, order=1, mode="constant"), 0, 1)
    del inside
    total = fractions.sum(axis=0)
    fractions = np.divide(fractions, total, out=np.zeros_like(fractions), where=total > 0)
    mask = brain & (total > 0)

    # Parameters per tissue (smooth fields), blended by tissue fraction.
    corr_mm = rng.uniform(6.0, 30.0) if config.wide_priors else config.field_correlation_mm
    corr_vox = corr_mm / vs
    priors = _patient_priors(rng) if config.wide_priors else (config.tissue_priors or TISSUE_PRIORS)
    # One smooth field per parameter, scaled by each tissue's SD around each tissue's mean (tissues
    # occupy different places, so sharing the field costs no realism and saves most of the time).
    params = {name: np.zeros(out_shape, dtype=np.float64) for name in physics.PARAMETER_NAMES}
    fields = {name: smooth_field(rng, out_shape, corr_vox) for name in physics.PARAMETER_NAMES}
    for t, tissue in enumerate(TISSUES):
        f = fractions[t]
        prior = priors[tissue]
        for name in ("R2", "Y", "v", "chi_nb"):
            mean, sd, lo, hi = prior[name]
            # Each patient's tissue mean shifts a little too (inter-subject variation).
            m = mean + (0.0 if config.wide_priors else 0.5 * sd * rng.standard_normal())
            params[name] += f * _truncated(m, sd, lo, hi, fields[name])
        params["S0"] += f * prior["S0"] * (1.0 + 0.03 * fields["S0"])

    if config.independent_fraction > 0:
        _blend_independent(params, mask, rng, out_shape, corr_vox, config.independent_fraction)

    # Lesions, defined in template space so that their mirror is the true contralateral region.
    lesion_map = np.zeros(out_shape, dtype=np.uint8)
    lesions = []
    has_lesions = rng.random() < 0.6 if config.lesions is None else config.lesions
    if has_lesions and config.lesion_count is None:
        n_lesions = int(rng.integers(1, 3))
        for _ in range(n_lesions):
            lesion = _add_lesion(params, fractions, mask, coords, t_spacing, midline_i, rng, out_shape,
                                 corr_vox, lesion_map)
            if lesion:
                lesions.append(lesion)
    elif has_lesions:
        lo_n, hi_n = config.lesion_count
        for _ in range(int(rng.integers(lo_n, hi_n + 1))):
            lesions += _add_stroke_lesion(params, fractions, mask, coords, t_spacing, midline_i, rng,
                                          out_shape, corr_vox, lesion_map, config)

    # Receive-field (coil) bias and the signal scale go into S0: S0 is in the data's units.
    coil_bias = rng.uniform(0.0, 0.5) if config.wide_priors else config.coil_bias
    bias = 1.0 + coil_bias * 0.5 * np.tanh(smooth_field(rng, out_shape, 60.0 / vs))
    params["S0"] *= config.s0_scale * bias

    labels = np.where(mask, 1 + np.argmax(fractions, axis=0), 0).astype(np.uint8)
    labels[lesion_map == 1] = LESION_LABELS["misery"]
    labels[lesion_map == 2] = LESION_LABELS["infarct"]
    for name in params:
        params[name] = np.where(mask, params[name], 0.0).astype(np.float32)
    return VirtualPatient(params, mask, labels, lesion_map, geometry, lesions)


def _rotation(angles):
    a, b, c = angles
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rx @ ry @ rz


def _blend_independent(params, mask, rng, shape, corr_vox, fraction):
    """Replace a smooth-edged share of the brain by parameters uniform within the hard bounds."""
    selector = smooth_field(rng, shape, 2 * corr_vox)
    threshold = np.quantile(selector[mask], 1.0 - fraction) if fraction < 1 else -np.inf
    weight = np.clip((selector - threshold) / 0.3 + 0.5, 0.0, 1.0) if fraction < 1 else np.ones(shape)
    for name in physics.PARAMETER_NAMES:
        lo, hi = physics.BOUNDS[name] if name != "S0" else (0.6, 1.1)
        uniform = special.ndtr(smooth_field(rng, shape, corr_vox / 2))  # uniform in (0, 1)
        params[name] = (1 - weight) * params[name] + weight * (lo + (hi - lo) * uniform)


@functools.lru_cache(maxsize=1)
def _lesion_candidates(midline_i: float) -> np.ndarray:
    """Template voxels that can centre a lesion: mostly cortical GM or WM, away from the midline."""
    fractions_t = _templates()[0]
    tissue_t = fractions_t[0] + fractions_t[1]
    candidates = np.argwhere(tissue_t > 0.9)
    return candidates[np.abs(candidates[:, 2] - midline_i) > 15]


def _add_lesion(params, fractions, mask, coords, t_spacing, midline_i, rng, shape, corr_vox, lesion_map):
    """One misery-perfusion or infarct-core lesion, a sphere or a blob, in GM/WM."""
    kind = "misery" if rng.random() < 0.5 else "infarct"
    candidates = _lesion_candidates(midline_i)
    if len(candidates) == 0:
        return None
    centre = candidates[rng.integers(len(candidates))].astype(np.float32)
    radius = rng.uniform(5.0, 15.0)  # mm
    blob = rng.random() < 0.5
    blob_dirs = rng.standard_normal((3, 3))
    blob_phases = rng.uniform(0, 2 * np.pi, 3)
    brain_idx = np.flatnonzero(mask & (fractions[4] < 0.5))  # lesions live in tissue, not CSF
    brain_coords = coords.reshape(3, -1)[:, brain_idx]

    def inside(mirror: bool) -> np.ndarray:
        """Flat indices of the voxels whose template position lies in the (mirrored) lesion."""
        x = 2 * midline_i - brain_coords[2] if mirror else brain_coords[2]
        d = np.stack([(brain_coords[0] - centre[0]) * t_spacing[0], (brain_coords[1] - centre[1]) * t_spacing[1],
                      (x - centre[2]) * t_spacing[2]])
        near = np.all(np.abs(d) < 1.3 * radius, axis=0)  # cheap box test first
        d = d[:, near]
        r = np.sqrt((d * d).sum(axis=0))
        limit = radius
        if blob:  # radius modulated by a few random low-order harmonics of the direction
            u = d / np.maximum(r, 1e-6)
            limit = radius * (1 + 0.3 * sum(np.cos(3 * (w @ u) + p) for w, p in zip(blob_dirs, blob_phases)) / 3)
        return brain_idx[np.flatnonzero(near)[r < limit]]

    region_idx = inside(False)
    if region_idx.size < 5:
        return None
    mirror_idx = inside(True)
    region = np.zeros(shape, dtype=bool)
    region.flat[region_idx] = True
    mirror = np.zeros(shape, dtype=bool)
    mirror.flat[mirror_idx] = True
    mirror &= ~region & (lesion_map == 0)
    z = smooth_field(rng, shape, corr_vox)
    if kind == "misery":
        y_mean = rng.uniform(*MISERY_Y)
        params["Y"][region] = np.clip(y_mean + 0.03 * z[region], *MISERY_Y)
        params["v"][region] = rng.uniform(*MISERY_V)
        code = 1
    else:
        y_mean = rng.uniform(*INFARCT_Y)
        params["Y"][region] = np.clip(y_mean + 0.03 * z[region], *INFARCT_Y)
        params["v"][region] = rng.uniform(*INFARCT_V)
        params["R2"][region] = np.maximum(params["R2"][region] - rng.uniform(*INFARCT_R2_DROP),
                                          physics.BOUNDS["R2"][0])
        params["S0"][region] *= INFARCT_S0_FACTOR
        code = 2
    lesion_map[region] = code
    lesion_map[mirror] = code + 2
    return {"type": "misery_perfusion" if code == 1 else "infarct_core", "shape": "blob" if blob else "sphere",
            "radius_mm": round(float(radius), 2), "voxels": int(region.sum()),
            "mean_OEF_percent": round(float(100 * physics.oef_from_Y(params["Y"][region]).mean()), 2)}


# --- Stroke-like patients ---------------------------------------------------------------------
def _patient_priors(rng: np.random.Generator) -> dict:
    """Tissue priors drawn for one patient from wide ranges around physics.md's design values.

    A shared shift (the patient's global oxygenation, blood volume, relaxation and susceptibility
    offsets) plus a small per-tissue shift; within-tissue spreads scaled by a per-patient factor.
    Truncation widens to ranges that keep every tissue physiological.
    """
    y_shift, v_factor = rng.uniform(-0.14, 0.12), rng.uniform(0.6, 1.5)
    r2_shift, chi_shift, spread = rng.normal(0.0, 2.5), rng.uniform(-0.03, 0.03), rng.uniform(0.4, 1.6)
    priors = {}
    for tissue, prior in TISSUE_PRIORS.items():
        if tissue == "CSF":
            priors[tissue] = prior
            continue
        (y, y_sd, _, _), (v, v_sd, _, _) = prior["Y"], prior["v"]
        (r2, r2_sd, r2_lo, r2_hi), (chi, chi_sd, chi_lo, chi_hi) = prior["R2"], prior["chi_nb"]
        v_mean = v * v_factor * rng.normal(1.0, 0.1)
        priors[tissue] = {
            "Y": (y + y_shift + rng.normal(0, 0.02), y_sd * spread, 0.30, 0.88),
            "v": (v_mean, v_sd * v_factor * spread, 0.006, 0.08),
            "R2": (r2 + r2_shift + rng.normal(0, 1.0), r2_sd * spread, max(3.0, r2_lo - 6), r2_hi + 6),
            "chi_nb": (chi + chi_shift + rng.normal(0, 0.01), chi_sd * spread, chi_lo - 0.05, chi_hi + 0.05),
            "S0": prior["S0"] * rng.uniform(0.9, 1.1),
        }
    return priors


@functools.lru_cache(maxsize=1)
def _template_depth() -> tuple[np.ndarray, np.ndarray]:
    """Depth below the brain surface (mm) of every template voxel, and the brain's centroid (index)."""
    _, brain_t, geom_t, _ = _templates()
    depth = ndimage.distance_transform_edt(brain_t, sampling=np.array(geom_t.spacing)[::-1]).astype(np.float32)
    return depth, np.argwhere(brain_t).mean(axis=0).astype(np.float32)


@functools.lru_cache(maxsize=1)
def _cortical_candidates(midline_i: float) -> np.ndarray:
    """Template voxels in the cortical ribbon (GM, within 8 mm of the surface), off the midline."""
    fractions_t = _templates()[0]
    depth, _ = _template_depth()
    candidates = np.argwhere((fractions_t[0] > 0.5) & (depth < 8.0) & (depth > 1.0))
    return candidates[np.abs(candidates[:, 2] - midline_i) > 15]


def _add_stroke_lesion(params, fractions, mask, coords, t_spacing, midline_i, rng, shape, corr_vox, lesion_map,
                       config) -> list[dict]:
    """One stroke-like lesion (and, sometimes, an infarct core nested in a penumbra)."""
    kind = "misery" if rng.random() < 0.5 else "infarct"
    lesion_shape = str(rng.choice(config.lesion_shapes))
    lo, hi = config.lesion_size_mm
    size = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))  # log-uniform: many small lesions
    edge_mm = 0.0 if rng.random() < 0.4 else rng.uniform(0.5, 4.0)  # hard or soft border
    cortical = lesion_shape in ("wedge", "territory")
    candidates = _cortical_candidates(midline_i) if cortical else _lesion_candidates(midline_i)
    if len(candidates) == 0:
        return []
    centre = candidates[rng.integers(len(candidates))].astype(np.float32)
    geometry = _LesionShape(lesion_shape, centre, size, rng, t_spacing, midline_i)
    made = []
    lesion = _place(geometry, kind, params, fractions, mask, coords, rng, shape, corr_vox, lesion_map, edge_mm)
    if lesion:
        made.append(lesion)
        if kind == "misery" and rng.random() < NESTED_CORE_PROBABILITY and size >= 8.0:
            core = _LesionShape("sphere" if rng.random() < 0.5 else "blob", geometry.core_centre(),
                                size * rng.uniform(0.3, 0.6), rng, t_spacing, midline_i)
            nested = _place(core, "infarct", params, fractions, mask, coords, rng, shape, corr_vox, lesion_map,
                            edge_mm)
            if nested:
                made.append(dict(nested, nested_in_penumbra=True))
    return made


class _LesionShape:
    """A lesion's shape in template space: signed distance (mm, > 0 inside) of template positions."""

    def __init__(self, kind, centre, size_mm, rng, t_spacing, midline_i):
        self.kind, self.centre, self.size, self.spacing = kind, np.asarray(centre, np.float32), size_mm, t_spacing
        self.midline_i = midline_i
        self.blob_dirs = rng.standard_normal((3, 3))
        self.blob_phases = rng.uniform(0, 2 * np.pi, 3)
        depth, brain_centre = _template_depth()
        self.depth = depth
        if kind in ("wedge", "territory"):
            # Axis from deep inside the hemisphere out to the cortical centre point.
            inner = brain_centre.copy()
            inner[2] = midline_i + 0.35 * (centre[2] - midline_i)  # stay in the lesion's hemisphere
            self.axis = (self.centre - inner) * t_spacing
            self.length = float(np.linalg.norm(self.axis))
            self.axis /= max(self.length, 1e-6)
            self.inner = inner
            # wedge: a cone from a point part-way in; territory: a wider cone, only the outer ribbon
            self.apex_fraction = rng.uniform(0.35, 0.65) if kind == "wedge" else 0.0
            self.ribbon_mm = rng.uniform(5.0, 12.0)
            self.half_angle = np.arctan2(0.5 * size_mm, max(self.length * (1 - self.apex_fraction), 1.0))

    @property
    def reach_mm(self) -> float:
        return (self.length + 5.0) if self.kind in ("wedge", "territory") else 1.4 * 0.5 * self.size

    def core_centre(self) -> np.ndarray:
        if self.kind in ("wedge", "territory"):  # the middle of the cortical end
            return self.centre - self.axis * (0.25 * self.size) / self.spacing
        return self.centre

    def signed_distance(self, pos_idx: np.ndarray) -> np.ndarray:
        """pos_idx: (3, N) template index positions -> (N,) mm inside the lesion's border."""
        if self.kind in ("sphere", "blob"):
            d = (pos_idx - self.centre[:, None]) * self.spacing[:, None]
            r = np.sqrt((d * d).sum(axis=0))
            limit = 0.5 * self.size
            if self.kind == "blob":  # radius modulated by low-order harmonics of the direction
                u = d / np.maximum(r, 1e-6)
                limit = limit * (1 + 0.3 * sum(np.cos(3 * (w @ u) + p) for w, p in zip(self.blob_dirs, self.blob_phases)) / 3)
            return limit - r
        apex = self.inner + (self.centre - self.inner) * self.apex_fraction
        d = (pos_idx - apex[:, None]) * self.spacing[:, None]
        along = self.axis @ d
        across = np.sqrt(np.maximum((d * d).sum(axis=0) - along ** 2, 0.0))
        cone = np.tan(self.half_angle) * np.maximum(along, 0.0) - across  # mm inside the cone's wall
        inside = np.minimum(cone, along)
        if self.kind == "territory":
            depth = ndimage.map_coordinates(self.depth, pos_idx, order=1, mode="constant")
            inside = np.minimum(inside, self.ribbon_mm - depth)
        return inside


def _place(geometry: _LesionShape, kind, params, fractions, mask, coords, rng, shape, corr_vox, lesion_map,
           edge_mm) -> dict | None:
    """Write one lesion's parameters (blended over `edge_mm` at its border) and its mirror region."""
    brain_idx = np.flatnonzero(mask & (fractions[4] < 0.5) & (lesion_map != 2))  # cores stay
    brain_coords = coords.reshape(3, -1)[:, brain_idx]

    def weights(mirror: bool):
        pos = brain_coords.copy()
        if mirror:
            pos[2] = 2 * geometry.midline_i - pos[2]
        reach = geometry.reach_mm / geometry.spacing
        centre = geometry.inner if geometry.kind in ("wedge", "territory") else geometry.centre
        span = np.abs(pos - ((geometry.centre + centre) / 2)[:, None])
        near = np.flatnonzero(np.all(span < reach[:, None] + 2, axis=0))  # cheap box test first
        s = geometry.signed_distance(pos[:, near])
        w = (s > 0).astype(np.float32) if edge_mm == 0 else np.clip(s / edge_mm + 0.5, 0.0, 1.0)
        keep = w > 0
        return brain_idx[near[keep]], w[keep]

    idx, w = weights(False)
    core_idx = idx[w >= 0.5]
    if core_idx.size < 2:
        return None
    mirror_idx, mirror_w = weights(True)
    mirror_idx = mirror_idx[mirror_w >= 0.5]
    z = smooth_field(rng, shape, corr_vox).reshape(-1)[idx]
    host = {name: params[name].reshape(-1)[idx] for name in physics.PARAMETER_NAMES}
    new = dict(host)
    if kind == "misery":
        y_range, v_factor = STROKE_MISERY_Y, STROKE_MISERY_V_FACTOR
    else:
        y_range, v_factor = STROKE_INFARCT_Y, STROKE_INFARCT_V_FACTOR
    y_mean = rng.uniform(*y_range)
    new["Y"] = np.clip(y_mean + 0.03 * z, *y_range)
    new["v"] = np.clip(host["v"] * rng.uniform(*v_factor), *physics.BOUNDS["v"])
    if kind == "infarct":
        new["R2"] = np.maximum(host["R2"] - rng.uniform(*INFARCT_R2_DROP), physics.BOUNDS["R2"][0])
        new["S0"] = host["S0"] * INFARCT_S0_FACTOR
    for name in physics.PARAMETER_NAMES:
        params[name].reshape(-1)[idx] = (1 - w) * host[name] + w * new[name]
    code = 1 if kind == "misery" else 2
    flat_map = lesion_map.reshape(-1)
    mirror_idx = mirror_idx[(flat_map[mirror_idx] == 0) | (flat_map[mirror_idx] >= 3)]
    mirror_idx = np.setdiff1d(mirror_idx, core_idx)
    flat_map[core_idx] = code
    flat_map[mirror_idx] = code + 2
    oef = 100 * physics.oef_from_Y(params["Y"].reshape(-1)[core_idx])
    return {"type": "misery_perfusion" if code == 1 else "infarct_core", "shape": geometry.kind,
            "size_mm": round(float(geometry.size), 2), "edge_mm": round(float(edge_mm), 2),
            "voxels": int(core_idx.size), "mean_OEF_percent": round(float(oef.mean()), 2)}
