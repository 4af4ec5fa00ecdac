"""Calibration of the spatial models' 90 % OEF interval on calibration patients (their own seed): split
conformal prediction, in one factor (the U-Net) or per bin (Mondrian; the default model), so that the
interval holds the truth in 90 % of voxels where the network is unsure and where it sees a lesion, not
only on average."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .. import decay, evaluate, methods, models, physics, resources, simulate, spatial
from .data import CALIBRATION_SEED, stroke_patient

WIDTH_BINS = 5  # quantile bins of the network's half-width
ABNORMALITY_EDGES_PP = (5.0, 10.0)  # |OEF - brain median|: normal, unusual, lesion-like
MIN_BIN_VOXELS = 200  # a bin with fewer calibration voxels keeps the overall factor
MIN_VOLUMES_PER_KIND = 4  # volumes with and without each resampling term of the interval's scale
# The contrast gain's shrinks are made this much smaller (spatial.contrast_gain): on development volumes
# (seed 9881) this cost 0.01-0.02 pp of RMSE at SNR 20-70 and nothing above, while a shrink of 0.07 at SNR
# 100 had cost the stroke test set 4 points of lesion contrast.
SMALLEST_SHRINK = 0.1
# The volume scale bends with the noise level (on the 60 calibration volumes a line left the volumes at SNR
# 80-140 0.02 too low in log10 factor and those at both ends 0.02 too high; a parabola's leave-one-out
# residual 0.0427 against 0.0451); fewer volumes fit a line.
MIN_VOLUMES_FOR_CURVATURE = 20


def conformal_factor(scores: np.ndarray, coverage: float = 0.90) -> float:
    """Split conformal quantile with the finite-sample correction."""
    n = len(scores)
    q = min(1.0, math.ceil((n + 1) * coverage) / n)
    return float(np.quantile(scores, q))


def interval_scores(out: dict, truth: np.ndarray) -> np.ndarray:
    """Per voxel, the factor on its interval's half-width that would just cover the truth."""
    oef = out["OEF"]
    return sided_scores(oef, truth, np.maximum(oef - out["OEF_p05"], 1e-3), np.maximum(out["OEF_p95"] - oef, 1e-3))


def sided_scores(oef, truth, below, above) -> np.ndarray:
    """interval_scores from the estimate and the half-widths below and above it."""
    return np.where(truth < oef, (oef - truth) / below, (truth - oef) / above)


def uncalibrated(model, card: dict, path: Path = Path(".")):
    """The model as a bundle whose interval has no conformal factor yet (the raw network interval), and whose
    map has no contrast gain (spatial.contrast_gain)."""
    spatial_info = {k: v for k, v in card["spatial"].items() if k != "contrast_gain"}
    return models.ModelBundle(model, dict(card, spatial=dict(spatial_info, interval_scale=1.0)), path)


def calibration_scores(model, card: dict, config, progress=None) -> np.ndarray:
    """The U-Net's scores: per metric-mask voxel of population-prior calibration patients at the paper's
    protocol (SNR 50-200, QSM noise 1-3 ppb)."""
    scores = []
    protocol = physics.Protocol.default()
    bundle = uncalibrated(model, card)
    for i in range(config.calibration_patients):
        ss = np.random.SeedSequence([CALIBRATION_SEED, i])
        patient, _, _ = stroke_patient(ss, config, i, wide=False)
        rng = np.random.default_rng([CALIBRATION_SEED, i, 9])
        noise = simulate.NoiseModel(float(rng.choice([50.0, 100.0, 200.0])), float(rng.choice([1.0, 2.0, 3.0])))
        echoes, qsm, _ = simulate.synthesize(patient.params, patient.mask, protocol, noise, rng)
        out = spatial.predict_volume(bundle, echoes, qsm, patient.mask, (config.voxel_size_mm,) * 3)
        inside = patient.metric_mask[patient.mask]
        scores.append(interval_scores({k: v[inside] for k, v in out.items()}, patient.oef_percent[patient.mask][inside]))
        if progress:
            progress(i + 1, config.calibration_patients)
    return np.concatenate(scores)


def mondrian_factors(scores: np.ndarray, widths: np.ndarray, abnormal: np.ndarray) -> dict:
    """Per-bin conformal factors from per-voxel scores (interval_scores), half-widths (pp, before any factor)
    and predicted abnormality (pp): the card's "interval_scale" (see spatial.interval_factors) and a record."""
    width_edges = np.quantile(widths, np.linspace(0, 1, WIDTH_BINS + 1)[1:-1])
    w_bin = np.searchsorted(width_edges, widths)
    a_bin = np.searchsorted(ABNORMALITY_EDGES_PP, abnormal)
    overall = conformal_factor(scores)
    factors = np.full((len(ABNORMALITY_EDGES_PP) + 1, WIDTH_BINS), overall)
    counts = np.zeros(factors.shape, int)
    for a in range(factors.shape[0]):
        for w in range(WIDTH_BINS):
            inside = (a_bin == a) & (w_bin == w)
            counts[a, w] = int(inside.sum())
            if counts[a, w] >= MIN_BIN_VOXELS:
                factors[a, w] = conformal_factor(scores[inside])
    return {"interval_scale": {"width_edges_pp": [round(float(e), 4) for e in width_edges],
                               "abnormality_edges_pp": list(ABNORMALITY_EDGES_PP),
                               "factors": [[round(float(f), 4) for f in row] for row in factors]},
            "record": {"voxels": int(len(scores)), "voxels_per_bin": counts.tolist(),
                       "coverage_before": round(float(np.mean(scores <= 1.0)), 4), "single_factor": round(overall, 4),
                       "method": "Mondrian split conformal, 90 %, by half-width x abnormality"}}


def contrast_gain_fit(volumes: list[dict]) -> tuple[dict | None, dict]:
    """The map's contrast gain as a line in the noise level (spatial.contrast_gain), fitted by least squares
    over the metric voxels of raw calibration volumes (calibration_volumes): truth - centre ~ gain x (estimate
    - centre), centre the brain's median estimate, gain = intercept + slope x the volume's noise level (its
    shrinks then made SMALLEST_SHRINK smaller, spatial.contrast_gain). Returns
    the card's "contrast_gain" entry (None with fewer than 3 volumes or an unknown noise level) and a record:
    the RMSE before and after, and each volume's own best gain by noise level."""
    volumes = [v for v in volumes if len(v["oef"])]
    levels = np.array([v["noise_level"] for v in volumes], dtype=float)
    if len(volumes) < 3 or not np.isfinite(levels).all():
        return None, {}
    deviation = [v["oef"].astype(np.float64) - v["centre"] for v in volumes]
    target = np.concatenate([v["truth"] - v["centre"] for v in volumes])
    design = np.concatenate([np.column_stack([d, level * d]) for d, level in zip(deviation, levels)])
    intercept, slope = np.linalg.lstsq(design, target, rcond=None)[0]
    fit = {"intercept": round(float(intercept), 4), "slope": round(float(slope), 4),
           "noise_levels": [round(float(levels.min()), 3), round(float(levels.max()), 3)],
           "smallest_shrink": SMALLEST_SHRINK}
    own = [float(np.dot(v["truth"] - v["centre"], d) / max(np.dot(d, d), 1e-12)) for v, d in zip(volumes, deviation)]
    after = [with_contrast_gain(v, fit) for v in volumes]

    def rmse(vs):
        return round(float(np.sqrt(np.mean(np.concatenate([(v["oef"] - v["truth"]) ** 2 for v in vs])))), 4)

    record = {"voxels": int(len(target)), "rmse_before_pp": rmse(volumes), "rmse_after_pp": rmse(after),
              "volumes_noise_level_and_own_gain": np.round(np.column_stack([levels, own]), 3).tolist(),
              "method": "least squares of truth - median on (estimate - median) x (1, noise level)"}
    return fit, record


def with_contrast_gain(volume: dict, fit: dict | None) -> dict:
    """A raw calibration volume (calibration_volumes) as the engine maps it with the contrast gain `fit`
    (spatial.contrast_gain): its estimate, interval scores and abnormality after the gain."""
    gain = spatial.contrast_gain(fit, volume["noise_level"])
    if gain == 1.0:
        return volume
    oef = spatial.apply_gain(volume["oef"], gain, volume["centre"])
    return dict(volume, oef=oef, scores=sided_scores(oef, volume["truth"], volume["below"], volume["above"]),
                abnormal=np.abs(oef - volume["centre"]))


# --- Recalibrating a trained model's interval over the acquisitions it reads ------------------------
def draw_acquisition(rng: np.random.Generator, supported, paper_share: float = 0.3, taken=()) -> physics.Protocol:
    """The paper's protocol for `paper_share` of draws, else a random protocol the model reads; none that a
    range of `taken` reads (the bundled models the engine prefers: such data never reach this model)."""
    from .data import random_protocol

    if supported is None or (not taken and rng.random() < paper_share):
        return physics.Protocol.default()
    while True:
        protocol = random_protocol(rng, supported, margin=0.0)
        if not supported.problems(protocol) and all(r.problems(protocol) for r in taken):
            return protocol


def preferred_ranges(bundle) -> list:
    """The protocol ranges of the bundled models that the engine runs before a model of this file name (the
    same method's bundled models listed ahead of it; predict.bundled_for_protocol): empty for the others."""
    names = list(methods.of_card(bundle.card).model_files)
    if bundle.path.name not in names:
        return []
    return [decay.ProtocolRange.from_dict(models.read_card(resources.resource_path("Models", name))["supported_protocols"])
            for name in names[:names.index(bundle.path.name)]]


def volume_scale_fit(levels, resamplings, scores) -> tuple[dict | None, np.ndarray]:
    """The interval's per-volume scale (spatial.noise_scale): the factor each volume needs grows with its noise
    and with the error of resampling another echo train, so log10(its own conformal factor) is fitted as a
    parabola in its noise level (a line with fewer than MIN_VOLUMES_FOR_CURVATURE volumes) and the terms of
    decay.Resampling (a step where resampled, a slope in the ms continued
    beyond the echoes, a slope in the ms by which its widest echo gap exceeds the model's), each term only when
    the set has enough volumes with and without it. Per volume: its noise level (decay.noise_level), its
    decay.Resampling (None: measured at the model's echo times), its scores. Returns the card's "noise" entry
    (None with fewer than 3 volumes or an unknown noise level) and the table it was fitted to: per volume, its
    noise level, its value of each term, its log10 factor."""
    names = list(decay.Resampling().covariates())
    per_volume = np.array([[level] + list((resampling or decay.Resampling()).covariates().values())
                           + [np.log10(conformal_factor(score))]
                           for level, resampling, score in zip(levels, resamplings, scores) if len(score)])
    if len(per_volume) < 3 or not np.isfinite(per_volume[:, 0]).all():
        return None, per_volume
    terms = {}  # the resampling terms, each fitted only where the set holds enough volumes with it and without
    for column, name in enumerate(names, start=1):
        n_with = int(np.count_nonzero(per_volume[:, column]))
        if min(n_with, len(per_volume) - n_with) >= MIN_VOLUMES_PER_KIND:
            terms[name] = per_volume[:, column]
    levels = per_volume[:, 0]
    lo, hi = float(levels.min()), float(levels.max())
    curve = [(levels - 0.5 * (lo + hi)) ** 2] if len(per_volume) >= MIN_VOLUMES_FOR_CURVATURE else []
    design = np.column_stack([np.ones(len(per_volume)), levels] + curve + list(terms.values()))
    coef = list(np.linalg.lstsq(design, per_volume[:, -1], rcond=None)[0])
    noise_fit = {"intercept": round(float(coef.pop(0)), 4), "slope": round(float(coef.pop(0)), 4)}
    if curve:
        noise_fit.update(curvature=round(float(coef.pop(0)), 4), noise_levels=[round(lo, 3), round(hi, 3)])
    noise_fit.update({name: round(float(c), 4) for name, c in zip(terms, coef)})
    return noise_fit, per_volume


def calibration_volumes(bundle, config, seed: int = CALIBRATION_SEED, wide: bool = False, progress=None,
                        features=None):
    """Per calibration volume, the model's raw map and interval (no contrast gain, no conformal factor; see
    with_contrast_gain) through the engine's own path
    (spatial.predict_volume: resampling of other protocols included): `config.calibration_patients` patients
    of `seed` (population tissue priors, or wide ones), each at a protocol the model reads and the engine gives
    it (none that a bundled model it prefers reads: preferred_ranges), with noise, a receive-field bias and a
    QSM offset drawn as in training (noise.noisy_acquisition). Yields, on the volume's metric voxels: the
    estimate and truth (OEF, pp), the half-widths below and above, their mean ("widths"), the interval scores,
    the predicted abnormality (|OEF - the brain's median|) and which voxels are lesions (not their mirror
    regions); and the brain's median estimate ("centre", over the whole mask), its noise level, whether and
    how it was resampled (decay.Resampling), and its protocol.
    `features(echoes, qsm, mask, protocol, out)`, when given, returns more per-voxel arrays (of the mask's voxels,
    named) to yield on the metric voxels too (benchmarks that look for what tells where the interval misses)."""
    from .data import make_patient
    from .noise import noisy_acquisition

    raw_bundle = uncalibrated(bundle.model, bundle.card, bundle.path)
    taken = preferred_ranges(bundle)
    for i in range(config.calibration_patients):
        rng = np.random.default_rng([seed, i, 11])
        patient = make_patient(seed, i, config, wide=wide)
        protocol = draw_acquisition(rng, bundle.protocol_range, taken=taken)
        echoes, qsm, _, _ = noisy_acquisition(patient, protocol, rng, config)
        diagnostics = {}
        out = spatial.predict_volume(raw_bundle, echoes, qsm, patient.mask, (config.voxel_size_mm,) * 3, protocol,
                                     diagnostics=diagnostics)
        keep = patient.metric[patient.mask]
        truth = 100.0 * physics.oef_from_Y(patient.params[..., 2][patient.mask].astype(np.float64))
        oef = out["OEF"]
        below, above = np.maximum(oef - out["OEF_p05"], 1e-3), np.maximum(out["OEF_p95"] - oef, 1e-3)
        centre = float(np.median(oef)) if oef.size else 0.0
        yield {"oef": oef[keep], "truth": truth[keep], "below": below[keep], "above": above[keep],
               "widths": (0.5 * (out["OEF_p95"] - out["OEF_p05"]))[keep],
               "scores": sided_scores(oef, truth, below, above)[keep],
               "centre": centre, "abnormal": np.abs(oef - centre)[keep],
               "lesion": np.isin(patient.lesion_map[patient.mask], evaluate.LESION_CODES)[keep],
               "noise_level": diagnostics["noise_level"], "resampling": diagnostics["resampling"],
               "protocol": protocol.describe(),
               **{name: values[keep] for name, values in (features(echoes, qsm, patient.mask, protocol, out)
                                                          if features else {}).items()}}
        if progress:
            progress(i + 1, config.calibration_patients, "calibrating the interval")


def shipped_volumes(bundle, config, seed: int = CALIBRATION_SEED, wide: bool = False, progress=None, features=None):
    """calibration_volumes as the engine maps them with the card's contrast gain (with_contrast_gain): for
    benchmarks that try other interval calibrations on the map as shipped."""
    fit = bundle.card["spatial"].get("contrast_gain")
    for volume in calibration_volumes(bundle, config, seed, wide, progress, features):
        yield with_contrast_gain(volume, fit)


def recalibrate(bundle, config, progress=None) -> dict:
    """Calibration of a trained spatial model's map and interval on its calibration volumes (calibration_volumes:
    population-prior patients of CALIBRATION_SEED, `config.lesion_free_share` of them without lesions, an
    SNR drawn log-uniformly over `config.snr_range`, QSM noise over `config.qsm_noise_ppb_range`): first the map's
    contrast gain (contrast_gain_fit), then, on the map after it, the interval: a scale that grows
    with the volume's noise level (decay.noise_level) and with how its decay was resampled (volume_scale_fit,
    fitted to the volumes' own conformal factors), then Mondrian split conformal by half-width x
    abnormality on the scores relative to that scale. Returns the card's "contrast_gain", "interval_scale" and
    "calibration" entries."""
    volumes = list(calibration_volumes(bundle, config, progress=progress))
    gain_fit, gain_record = contrast_gain_fit(volumes)
    volumes = [with_contrast_gain(v, gain_fit) for v in volumes]
    scores, widths, abnormal, lesion = ([v[k] for v in volumes] for k in ("scores", "widths", "abnormal", "lesion"))
    levels = [v["noise_level"] for v in volumes]  # NaN for an empty mask: no noise scale is fitted then
    resamplings = [v["resampling"] for v in volumes]
    protocols = [v["protocol"] for v in volumes]
    noise_fit, per_volume = volume_scale_fit(levels, resamplings, scores)
    scale_of_volume = np.repeat([spatial.noise_scale({"noise": noise_fit}, level, resampling) if noise_fit else 1.0
                                 for level, resampling in zip(levels, resamplings)],
                                [len(score) for score in scores])  # per voxel
    scores, widths, abnormal, lesion = (np.concatenate(a) for a in (scores, widths, abnormal, lesion))
    found = mondrian_factors(scores / scale_of_volume, widths, abnormal)
    scale = found["interval_scale"]
    if noise_fit:
        scale["noise"] = noise_fit
        found["record"]["method"] += (", relative to a scale fitted to the volumes' noise level"
                                      + "".join(f", {name}" for name in noise_fit
                                                if name not in ("intercept", "slope", "noise_levels")))
    found["record"]["volumes_noise_level_resampling_and_log10_factor"] = {
        "columns": ["noise_level"] + list(decay.Resampling().covariates()) + ["log10_factor"],
        "rows": np.round(per_volume, 3).tolist()}
    factor = np.asarray(scale["factors"])[np.searchsorted(scale["abnormality_edges_pp"], abnormal),
                                          np.searchsorted(scale["width_edges_pp"], widths)] * scale_of_volume
    covered = scores <= factor

    def in_lesions(hit):  # None where the calibration patients have no lesion voxels (tiny sets)
        return round(float(hit[lesion].mean()), 4) if lesion.any() else None

    found["record"].update(coverage_after=round(float(covered.mean()), 4),
                           lesion_coverage_before=in_lesions(scores <= 1.0), lesion_coverage_after=in_lesions(covered))
    found["record"].update(patients=config.calibration_patients, seed=CALIBRATION_SEED, protocols=protocols,
                           noise=f"SNR {config.snr_range[0]:g}-{config.snr_range[1]:g} (log-uniform), QSM "
                                 f"{config.qsm_noise_ppb_range[0]:g}-{config.qsm_noise_ppb_range[1]:g} ppb",
                           priors="population (tissue priors of the design notes), stroke-like lesions",
                           lesion_voxels=int(lesion.sum()), contrast_gain=gain_record)
    return {"contrast_gain": gain_fit, "interval_scale": found["interval_scale"], "calibration": found["record"]}

