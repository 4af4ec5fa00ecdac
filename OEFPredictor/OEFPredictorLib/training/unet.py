"""Training the experimental spatial model (3D U-Net; not the default method) on stroke-like virtual patients made on the fly.

Data: `n_patients` stroke-like patients (phantom.PatientConfig.stroke: 2-6 lesions of both kinds,
all shapes, 3-25 mm; most with tissue priors drawn per patient from wide ranges, some lesion-free),
simulated noise-free at 2 mm. From each, patches of `patch`^3 voxels: one centred near each lesion,
the rest anywhere in the brain. Noise is added per batch, so no two epochs see the same noise:
Rician magnitude noise at an SNR drawn log-uniformly from `snr_range` (sigma relative to the
patient's mean brain echo 1), a smooth receive-field bias, and Gaussian QSM noise of
`qsm_noise_ppb_range`, white or spatially correlated. Random flips and axis permutations (the
physics has no orientation).

Lesions are a few per cent of the brain, so a plain voxel loss lets the network shrink them to the
tissue around them. Two levers counter that: `lesion_patch_share` of the patches are centred on
lesion voxels, and lesion voxels count `lesion_weight` times in the loss. Specificity is checked
separately on lesion-free patients (evaluate's invented-lesion volume). Each epoch logs the lesion
contrast the model recovers on the validation patches (val_penumbra, val_core).

Validation patients and calibration patients come from their own seeds. After training, split
conformal calibration on the calibration patients (whole brains with the population priors of
physics.md, SNR 50-200, QSM noise 1-3 ppb) widens or narrows the interval so that it holds 90 % of
their voxels; the factor goes into the card.
No test patient is ever simulated here: the test set of `evaluate` uses another seed.

Outputs next to MODEL.keras: the card MODEL.json, the per-epoch log MODEL.history.csv, and the
checkpoint folder MODEL.ckpt/ (the patch banks, last and best model, resume state); `--resume`
continues an interrupted run or a longer budget. `init_from` starts from the weights of an
earlier spatial model (a second stage with other settings); the card records it.
"""
from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np

from .. import models, physics, sequences, spatial
from ..errors import InputError
from .calibration import calibration_scores, conformal_factor
from .data import CALIBRATION_SEED, TRAIN_SEED, VALIDATION_SEED, stroke_patient
from .fitting import fit_keeping_best, initial_model, resumed_state, run_record, save_models
from .noise import add_noise


@dataclasses.dataclass
class SpatialTrainConfig:
    """Everything that defines a spatial training run (recorded in the model card)."""

    patients: int = 96
    validation_patients: int = 6
    calibration_patients: int = 8
    patches_per_patient: int = 14
    patch: int = 40  # voxels (2 mm): 80 mm of context
    batch_size: int = 3
    steps_per_epoch: int = 150
    epochs: int = 400
    learning_rate: float = 5e-4
    patience: int = 12  # epochs without a better validation loss
    time_limit_min: float | None = 55.0  # plus ~6 min making the patients: about an hour on 2 cores
    seed: int = 0  # weights and batch order; the patients come from the fixed seeds above
    voxel_size_mm: float = spatial.VOXEL_SIZE_MM
    snr_range: tuple[float, float] = (40.0, 250.0)
    qsm_noise_ppb_range: tuple[float, float] = (1.0, 4.0)
    wide_prior_share: float = 0.75
    lesion_free_share: float = 0.15
    filters: tuple[int, ...] = tuple(models.SPATIAL_UNET["filters"])
    lesion_patch_share: float = 0.6  # patches centred on a lesion voxel
    lesion_weight: float = 4.0  # loss weight of a lesion voxel (1 for the rest of the brain)
    init_from: str | None = None  # a spatial model whose weights this run starts from

    @property
    def spec(self) -> dict:
        return dict(models.SPATIAL_UNET, filters=list(self.filters))


# --- Patients and patches -------------------------------------------------------------------------


@dataclasses.dataclass
class PatchBank:
    """Noise-free patches, float16: signals (P, n, n, n, E + 1) with echoes relative to the patient's
    mean brain echo 1 and QSM in ppm; targets (P, n, n, n, 5) S0 (same units), R2, Y, v, chi_nb;
    mask (brain), weight (metric mask: brain without CSF) and lesion (lesion_map codes 1 misery
    perfusion, 2 infarct core, else 0) as uint8."""

    signals: np.ndarray
    targets: np.ndarray
    mask: np.ndarray
    weight: np.ndarray
    lesion: np.ndarray

    def save(self, path: Path) -> None:
        tmp = path.with_name(path.name + ".partial.npz")
        np.savez(tmp, **dataclasses.asdict(self))
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> "PatchBank":
        with np.load(path) as f:
            return cls(**{k: f[k] for k in ("signals", "targets", "mask", "weight", "lesion")})

    def __len__(self):
        return len(self.signals)


def _patch_starts(patient, n_patches: int, size: int, rng, lesion_share: float) -> list[np.ndarray]:
    """Corners of the patches: `lesion_share` centred on lesion voxels (both kinds in turn, so that
    small cores are not outnumbered by large penumbrae), the rest on brain voxels."""
    shape = np.array(patient.mask.shape)
    centres = []
    kinds = [np.argwhere(patient.lesion_map == code) for code in (1, 2)]
    kinds = [k for k in kinds if len(k)]
    for i in range(int(round(lesion_share * n_patches)) if kinds else 0):
        voxels = kinds[i % len(kinds)]
        centres.append(voxels[rng.integers(len(voxels))])
    brain = np.argwhere(patient.metric_mask)
    while len(centres) < n_patches:
        centres.append(brain[rng.integers(len(brain))])
    starts = []
    for c in centres:
        jitter = rng.integers(-size // 4, size // 4 + 1, 3)
        starts.append(np.clip(c + jitter - size // 2, 0, np.maximum(shape - size, 0)))
    return starts


def make_bank(seed: int, n_patients: int, config: SpatialTrainConfig, progress=None) -> PatchBank:
    size, parts = config.patch, {"signals": [], "targets": [], "mask": [], "weight": [], "lesion": []}
    for i in range(n_patients):
        ss = np.random.SeedSequence([seed, i])
        patient, echoes, qsm = stroke_patient(ss, config, i)
        rng = np.random.default_rng([seed, i, 7])
        reference = float(echoes[..., 0][patient.mask].mean())
        lesion = np.where(np.isin(patient.lesion_map, (1, 2)), patient.lesion_map, 0).astype(np.uint8)
        for start in _patch_starts(patient, config.patches_per_patient, size, rng, config.lesion_patch_share):
            sl = tuple(slice(int(a), int(a) + size) for a in start)
            block = _padded(np.concatenate([echoes[sl] / reference, qsm[sl][..., None]], axis=-1), size)
            parts["signals"].append(block.astype(np.float16))
            target = np.stack([patient.params[n][sl] for n in physics.PARAMETER_NAMES], axis=-1)
            target[..., 0] /= reference
            parts["targets"].append(_padded(target, size).astype(np.float16))
            parts["mask"].append(_padded(patient.mask[sl], size).astype(np.uint8))
            parts["weight"].append(_padded(patient.metric_mask[sl], size).astype(np.uint8))
            parts["lesion"].append(_padded(lesion[sl], size))
        if progress:
            progress(i + 1, n_patients)
    return PatchBank(**{k: np.stack(v) for k, v in parts.items()})


def _padded(block: np.ndarray, size: int) -> np.ndarray:
    pad = [(0, size - n) for n in block.shape[:3]] + [(0, 0)] * (block.ndim - 3)
    return np.pad(block, pad) if any(p[1] for p in pad) else block


# --- Batches: noise, bias, normalisation --------------------------------------------------------------


def noisy_batch(bank: PatchBank, rows, rng, config: SpatialTrainConfig, scaling: dict, augment: bool = True):
    """Network inputs (B, n, n, n, 9) and y_true (B, n, n, n, 7) for patches `rows` of the bank."""
    xs, ys = [], []
    mean, std = np.array(scaling["mean"], np.float32), np.array(scaling["std"], np.float32)
    for r in rows:
        signals = bank.signals[r].astype(np.float32)
        targets = bank.targets[r].astype(np.float32)
        mask, weight = bank.mask[r].astype(bool), bank.weight[r].astype(np.float32)
        weight = weight * np.where(bank.lesion[r] > 0, np.float32(config.lesion_weight), np.float32(1.0))
        n_echo = signals.shape[-1] - 1
        echoes, qsm, bias = add_noise(signals[..., :n_echo], signals[..., n_echo], rng, config)
        x = spatial.volume_features(echoes, qsm, mask, sequences.DEFAULT_INPUT_NORMALISATION["qsm_scale"])
        echo1 = np.where(mask, echoes[..., 0], 1.0)
        t = targets.copy()
        t[..., 0] = t[..., 0] * bias / echo1  # S0 relative to the voxel's (noisy) echo 1
        z = np.where(mask[..., None], (t - mean) / std, 0.0)
        oef = 1.0 - t[..., 2] / physics.YA
        y = np.concatenate([z, oef[..., None], weight[..., None]], axis=-1).astype(np.float32)
        if augment:
            for axis in range(3):
                if rng.random() < 0.5:
                    x, y = np.flip(x, axis), np.flip(y, axis)
            order = list(rng.permutation(3)) + [3]
            x, y = np.transpose(x, order), np.transpose(y, order)
        xs.append(np.ascontiguousarray(x))
        ys.append(np.ascontiguousarray(y))
    return np.stack(xs), np.stack(ys)


def fit_scaling(bank: PatchBank) -> dict:
    """z-scoring of the targets (S0 relative to echo 1 approximated by the noise-free signal)."""
    w = bank.weight.astype(bool)
    t = bank.targets[w].astype(np.float32)
    t[:, 0] /= np.maximum(bank.signals[..., 0][w].astype(np.float32), 1e-3)
    return models.fit_output_scaling(t)


def lesion_contrast_recovered(oef_pred, oef_true, metric, lesion) -> dict[str, float]:
    """Share of the true lesion contrast the prediction shows, per kind, pooled over patches:
    sum over patches of n (predicted lesion - predicted normal) / the same for the truth, where
    normal is the patch's metric-mask voxels outside lesions."""
    result = {}
    for code, name in ((1, "penumbra"), (2, "core")):
        num = den = 0.0
        for p, t, m, les in zip(oef_pred, oef_true, metric, lesion):
            inside, normal = m & (les == code), m & (les == 0)
            if inside.sum() < 2 or normal.sum() < 2:
                continue
            n = inside.sum()
            num += n * (p[inside].mean() - p[normal].mean())
            den += n * (t[inside].mean() - t[normal].mean())
        result[name] = float(num / den) if den else math.nan
    return result


def _lesion_monitor(x_val, y_val, lesion, scaling, batch_size: int):
    """A callback: val_penumbra and val_core (contrast recovered on the validation patches) per epoch."""
    import keras

    y_index = physics.PARAMETER_NAMES.index("Y")
    n = len(physics.PARAMETER_NAMES)
    metric = y_val[..., n + 1] > 0

    class LesionMonitor(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            z = self.model.predict(x_val, batch_size=batch_size, verbose=0)[..., y_index]
            oef = 1.0 - (z * scaling["std"][y_index] + scaling["mean"][y_index]) / physics.YA
            recovered = lesion_contrast_recovered(oef, y_val[..., n], metric, lesion)
            logs["val_penumbra"], logs["val_core"] = recovered["penumbra"], recovered["core"]

    return LesionMonitor()


# --- Calibration and card -----------------------------------------------------------------------------


def calibrated_card(model, config, scaling: dict, order: str, progress=None, **spatial_extra) -> dict:
    """The spatial model's card, its 90 % interval calibrated (split conformal) on the calibration
    patients: the factor and how it was found go into card["spatial"]."""
    card = models.make_card(
        config.spec, physics.Protocol.default(), scaling, 1, "centre",
        spatial={"voxel_size_mm": config.voxel_size_mm, "outputs": list(physics.PARAMETER_NAMES) + [
            "OEF interval below (raw)", "OEF interval above (raw)"], "interval": "90 % (5th-95th percentile)",
            "interval_scale": 1.0, **spatial_extra},
        window={"length": 1, "target": "centre", "order": order, "padding": "zeros"})
    report = None
    if progress:
        progress(0, config.calibration_patients, "calibrating the interval")
        report = lambda done, total: progress(done, total, "calibrating the interval")  # noqa: E731
    scores = calibration_scores(model, card, config, report)
    card["spatial"].update(interval_scale=round(conformal_factor(scores), 4), calibration={
        "patients": config.calibration_patients, "seed": CALIBRATION_SEED, "voxels": int(len(scores)),
        "priors": "population (physics.md)", "coverage_before": round(float(np.mean(scores <= 1.0)), 4),
        "method": "split conformal, 90 %"})
    return card




# --- Training -------------------------------------------------------------------------------------------
def train(out: str | Path, config: SpatialTrainConfig, resume: bool = False, command: str | None = None,
          verbose: int = 1, progress=None) -> dict:
    """Train the spatial model and save MODEL.keras + card. Returns the card."""
    import keras

    out = Path(out)
    if out.suffix != ".keras":
        raise InputError(f"--out {out}: a model file must end in .keras.")
    if config.patch % spatial.divisor(config.spec):
        raise InputError(f"The patch size must be a multiple of {spatial.divisor(config.spec)}.")
    ckpt = out.with_name(out.stem + ".ckpt")
    history_csv = out.with_name(out.stem + ".history.csv")
    started = time.perf_counter()
    state: dict = {}
    config_dict = _config_dict(config)
    if resume:
        state = resumed_state(ckpt, config_dict)
    elif ckpt.exists():
        # a fresh start keeps only the patch banks made with the same data settings (a deterministic cache)
        for item in ckpt.iterdir():
            if not (item.name.startswith("bank_") and item.name.endswith(f"_{_data_key(config)}.npz")):
                shutil.rmtree(item) if item.is_dir() else item.unlink()
    ckpt.mkdir(parents=True, exist_ok=True)

    banks = {}
    for name, seed, n in (("train", TRAIN_SEED, config.patients), ("validation", VALIDATION_SEED,
                                                                     config.validation_patients)):
        path = ckpt / f"bank_{name}_{_data_key(config)}.npz"
        if path.exists():
            banks[name] = PatchBank.load(path)
        else:
            report = (lambda done, total, name=name: progress(done, total, f"{name} patients")) if progress else None
            banks[name] = make_bank(seed, n, config, report)
            banks[name].save(path)
    initial = initial_model(config.init_from, config.spec, "unet") if config.init_from and not resume else None
    # a second stage keeps the first stage's output scaling, which its weights were trained for
    scaling = state.get("output_scaling") or (initial.card["output_scaling"] if initial else fit_scaling(banks["train"]))
    state.update(config=config_dict, output_scaling=scaling, wall_before=state.get("wall_so_far", 0.0))

    keras.utils.set_random_seed(config.seed)
    val_rng = np.random.default_rng([VALIDATION_SEED, 1])
    x_val, y_val = noisy_batch(banks["validation"], range(len(banks["validation"])), val_rng, config, scaling,
                               augment=False)
    loss = spatial.make_loss(scaling)
    if resume:
        # the optimizer state comes back with the model; the loss is ours, named in the file
        model = keras.saving.load_model(ckpt / "last.keras", custom_objects={loss.__name__: loss}, safe_mode=True)
    else:
        model = models.build_model(config.spec, n_features=x_val.shape[-1], n_outputs=spatial.N_OUTPUTS)
        if initial:
            model.set_weights(initial.model.get_weights())
        # clipnorm: without normalisation layers a rare steep batch can otherwise blow the weights up
        model.compile(optimizer=keras.optimizers.Adam(config.learning_rate, clipnorm=1.0), loss=loss)

    train_bank = banks["train"]

    class Batches(keras.utils.PyDataset):
        def __init__(self):
            super().__init__()
            self.rng = np.random.default_rng([config.seed, state.get("epoch", 0), 3])

        def __len__(self):
            return config.steps_per_epoch

        def __getitem__(self, i):
            rows = self.rng.integers(0, len(train_bank), config.batch_size)
            return noisy_batch(train_bank, rows, self.rng, config, scaling)

    monitor = _lesion_monitor(x_val, y_val, banks["validation"].lesion, scaling, config.batch_size)
    fit_keeping_best(model, Batches(), (x_val, y_val), monitor, ckpt, history_csv, config, state, started, verbose,
                     plateau_patience=4, min_lr=1e-5)
    card = calibrated_card(model, config, scaling, "whole volume (3D convolutions)", progress,
                           tile_voxels=spatial.TILE_VOXELS)
    card["training"] = {
        "data": "stroke-like virtual patients made on the fly (phantom.PatientConfig.stroke), 2 mm, noise per batch",
        "lesion_patch_share": config.lesion_patch_share, "lesion_weight": config.lesion_weight,
        "init_from": config.init_from, "init_from_sha256": models.sha256_of(config.init_from) if config.init_from else None,
        "train_patients": config.patients, "train_seed": TRAIN_SEED, "validation_patients": config.validation_patients,
        "validation_seed": VALIDATION_SEED, "patches": len(train_bank), "patch_voxels": config.patch,
        "snr_range": list(config.snr_range), "qsm_noise_ppb_range": list(config.qsm_noise_ppb_range),
        "wide_prior_share": config.wide_prior_share, "lesion_free_share": config.lesion_free_share,
        "optimizer": f"Adam(learning_rate={config.learning_rate:g}, clipnorm=1), halved on plateaus",
        "loss": "masked Huber on z-scored parameters (weights S0 .5, R2 .5, Y 2, v 1, chi_nb .5) + pinball 5/95 % on OEF",
        "batch_size": config.batch_size, "steps_per_epoch": config.steps_per_epoch,
        **run_record(config, state, started, history_csv, command),
    }
    models.save_bundle(model, card, out)
    return models.read_card(out)


_DATA_FIELDS = ("patients", "validation_patients", "patches_per_patient", "patch", "voxel_size_mm",
                "wide_prior_share", "lesion_free_share", "lesion_patch_share")


def _data_key(config: SpatialTrainConfig) -> str:
    """A short hash of the settings that decide the patch banks (plus the code's seeds)."""
    import hashlib

    text = json.dumps([getattr(config, f) for f in _DATA_FIELDS] + [TRAIN_SEED, VALIDATION_SEED])
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def _config_dict(config: SpatialTrainConfig) -> dict:
    d = json.loads(json.dumps(dataclasses.asdict(config)))  # tuples -> lists, as state.json holds them
    d.pop("epochs")
    d.pop("time_limit_min")
    return d
