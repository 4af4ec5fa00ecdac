"""Training the context model (the default method; spatial.py, decay.py, models.CONTEXT_NET) on whole
stroke-like virtual patients, for any common mGRE protocol and field strength.

Data: `patients` noise-free stroke-like patients (phantom.PatientConfig.stroke; most with tissue priors
drawn per patient from wide ranges, `lesion_free_share` without lesions) at 2 mm, kept in memory as
truth maps cropped to the brain. Each epoch draws `patients_per_epoch` of them and makes each anew:
- an echo protocol (the paper's for `paper_protocol_share`, else drawn over the supported range: 5-16
  echoes, first echo, spacing, last echo, 1.5-7 T; `random_protocol`), with R2 grown as B0^p;
- noise (noise.add_noise: SNR 18-250 log-uniform, QSM noise 1-4 ppb white or correlated, a
  smooth bias) and a constant QSM offset (another QSM reference);
- for a network bound to echo times (`echo_times_ms`, as the bundled models are): the decay resampled to
  them (decay.resample_echoes), drawing only acquisitions whose echoes cover their span;
- the network's inputs exactly as inference makes them (spatial.volume_features, spatial.network_inputs),
and the epoch samples `voxels_per_epoch` brain voxels (no CSF) from a pool of such draws (`VoxelPool`, of which
each epoch remakes). Lesion voxels count `lesion_weight` times in
the loss (lesions are a few per cent of the brain; lesion-free patients keep the model from seeing
lesions in noise).

Validation: whole validation patients (their own seed; every other one at the model's own echo times (the
paper's for a protocol-free network), the rest at drawn protocols) at SNR 40, 100 and 200, QSM noise 2 ppb; the epoch with the lowest validation loss
is kept, and each epoch logs the lesion contrast recovered on them (val_penumbra, val_core: lesion vs
contralateral mirror, as evaluate reports it). Then the interval is calibrated through the engine's own
path, as the saved model runs, on population-prior calibration patients at drawn protocols and noise
(calibration.recalibrate). No test patient is ever simulated here.

Outputs next to MODEL.keras: the card MODEL.json (with the supported protocol range), the per-epoch log
MODEL.history.csv, and the checkpoint folder MODEL.ckpt/ (last and best model, resume state). `init_from`
starts from the weights, input scale and output scaling of an earlier context model with the same architecture
and echo times (a second stage with other settings, e.g. a lower learning rate); the card records it.
"""
from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np

from .. import decay, evaluate, models, physics, sequences, spatial
from ..errors import InputError
from . import calibration, fitting
from .data import TRAIN_SEED, VALIDATION_SEED, Patient, make_patient, random_protocol, signals
from .noise import noisy_acquisition

VALIDATION_SNRS = (40.0, 100.0, 200.0)  # cycled over the validation patients
VALIDATION_QSM_NOISE_PPB = 2.0


@dataclasses.dataclass
class ContextTrainConfig:
    """Everything that defines a context-model training run (recorded in the model card)."""

    patients: int = 64
    validation_patients: int = 6
    # the interval's scale fits a term per way of resampling (decay.Resampling) on at least 4 volumes with it and
    # 4 without: 60 patients give about 40 resampled volumes
    calibration_patients: int = 60
    # Every epoch sees fresh draws (a patient at a drawn protocol, noise and QSM offset): draws kept over
    # epochs were memorised (each draw's protocol makes it recognisable) and the validation loss rose.
    pool_draws: int = 24  # draws whose voxels an epoch samples
    voxels_per_draw: int = 10000
    patients_per_epoch: int = 24  # draws made anew after each epoch (all of them)
    voxels_per_epoch: int = 240_000
    batch_size: int = 1024
    epochs: int = 300
    learning_rate: float = 5e-4
    patience: int = 15  # epochs without a better validation loss
    time_limit_min: float | None = 30.0  # plus ~2 min making the patients
    seed: int = 0  # weights, noise and voxel draws; the patients come from the fixed seeds
    voxel_size_mm: float = spatial.VOXEL_SIZE_MM
    snr_range: tuple[float, float] = (18.0, 250.0)  # SNR 20 inside, not at the edge
    qsm_noise_ppb_range: tuple[float, float] = (1.0, 4.0)
    qsm_offset_ppm: float = 0.06  # QSM references differ by a constant: drawn uniformly within +-this
    paper_protocol_share: float = 0.15  # draws at the model's own echo times (protocol-free: the paper's); the rest random
    # None: a protocol-free network (decay.py). Echo times (ms, at 3 T): a network bound to them, as the bundled
    # models are, which reads any other echo train covering their span by resampling it (decay.resample_echoes);
    # it is trained on such resampled draws, exactly as the engine will feed it.
    echo_times_ms: tuple[float, ...] | None = None
    r2_field_exponent: tuple[float, float] = (0.0, 1.0)  # R2 grows as B0^p (0.5-1 in tissue; 0: a simulator that keeps it)
    wide_prior_share: float = 0.75
    lesion_free_share: float = 0.3
    lesion_weight: float = 3.0
    sigmas_mm: tuple[float, ...] = tuple(models.CONTEXT_NET["sigmas_mm"])
    local_noise: bool = models.CONTEXT_NET["local_noise"]
    dense: tuple[int, ...] = tuple(models.CONTEXT_NET["dense"])
    init_from: str | None = None  # a context model whose weights this run starts from (a second stage)

    @property
    def spec(self) -> dict:
        spec = dict(models.CONTEXT_NET, sigmas_mm=list(self.sigmas_mm), local_noise=self.local_noise,
                    dense=list(self.dense))
        if self.echo_times_ms is not None:
            del spec["decay"]  # a bound model reads its own echo ratios
        return spec

    @property
    def own_protocol(self) -> physics.Protocol:
        """The model's own echo times: the bound ones, else the paper's (a protocol-free model's reference)."""
        if self.echo_times_ms is None:
            return physics.Protocol.default()
        return physics.Protocol.from_milliseconds(list(self.echo_times_ms), decay.REFERENCE_FIELD_T)

    @property
    def protocols(self) -> decay.ProtocolRange:
        if self.echo_times_ms is None:
            return decay.SUPPORTED
        return dataclasses.replace(decay.SUPPORTED, spans_ms=(float(self.echo_times_ms[0]), float(self.echo_times_ms[-1])))

    def draw_protocol(self, rng) -> physics.Protocol:
        """A training acquisition: the model's own echo times for `paper_protocol_share` of draws, else another."""
        return self.own_protocol if rng.random() < self.paper_protocol_share else self.other_protocol(rng)

    def other_protocol(self, rng) -> physics.Protocol:
        """An acquisition drawn over the supported range (for a bound model, one it reads: echoes covering its
        span, up to its extrapolation_ms)."""
        if self.echo_times_ms is None:
            return random_protocol(rng, self.protocols)
        return calibration.draw_acquisition(rng, self.protocols, paper_share=0.0)


def pyramid(patient: Patient, rng, config: ContextTrainConfig, snr=None, qsm_noise_ppb=None, protocol=None):
    """A noisy copy of the patient at `protocol` (None: drawn) -> (network inputs (z, y, x, F), targets
    with S0 relative to the noisy echo 1 (z, y, x, 5))."""
    protocol = protocol or config.draw_protocol(rng)
    echoes, qsm, t, bias = noisy_acquisition(patient, protocol, rng, config, snr, qsm_noise_ppb)
    own = config.own_protocol
    if config.echo_times_ms is not None and not protocol.matches(own):  # as the engine reads it (spatial.py)
        echoes = decay.resample_echoes(echoes, patient.mask, protocol, own, (config.voxel_size_mm,) * 3)
        protocol = own  # the targets' R2 is in 3 T-equivalent time already: the bound model's units
    reference, _ = decay.qsm_reference(echoes[..., 0][patient.mask], echoes[..., -1][patient.mask], qsm[patient.mask],
                                       protocol)
    features = spatial.volume_features(echoes, qsm, patient.mask, sequences.DEFAULT_INPUT_NORMALISATION["qsm_scale"],
                                       reference)
    x = spatial.network_inputs(features, patient.mask, config.spec, config.voxel_size_mm, protocol)
    t[..., 0] *= bias / np.where(patient.mask, echoes[..., 0], 1.0)
    return x, t


def voxel_rows(x, t, patient: Patient, where: np.ndarray, scaling: dict, lesion_weight: float):
    """(N, 1, 1, 1, F) inputs and (N, 1, 1, 1, 7) y_true (z-scored targets, true OEF, loss weight) of
    the flat voxel indices `where`: the network's 1x1x1 layers see each voxel as a 1-voxel volume."""
    n_features = x.shape[-1]
    xs = x.reshape(-1, n_features)[where]
    ts = t.reshape(-1, t.shape[-1])[where]
    z = (ts - np.array(scaling["mean"], np.float32)) / np.array(scaling["std"], np.float32)
    oef = 1.0 - ts[:, 2] / physics.YA
    lesion = np.isin(patient.lesion_map.reshape(-1)[where], evaluate.LESION_CODES)
    weight = np.where(lesion, np.float32(lesion_weight), np.float32(1.0))
    y = np.concatenate([z, oef[:, None], weight[:, None]], axis=1).astype(np.float32)
    return xs[:, None, None, None, :], y[:, None, None, None, :]


def fit_scaling(patients: list[Patient], protocol: physics.Protocol | None = None) -> dict:
    """z-scoring of the targets, from the noise-free patients at `protocol` (default: the paper's)."""
    protocol = protocol or physics.Protocol.default()
    rows = []
    for p in patients:
        echoes, _, t = signals(p, protocol, 1.0)
        t = t[p.metric]
        t[:, 0] /= np.maximum(echoes[..., 0][p.metric], 1e-3)
        rows.append(t)
    return models.fit_output_scaling(np.concatenate(rows))


class VoxelPool:
    """Training voxels of `pool_draws` draws (a patient at a drawn protocol, noise and QSM offset), of which
    each epoch remakes `patients_per_epoch`: every epoch's batches then span many protocols and noise
    levels (with only an epoch's own dozen draws, the fit swung from epoch to epoch)."""

    def __init__(self, patients: list[Patient], config: ContextTrainConfig, scaling: dict, epoch: int = 0,
                 progress=None):
        self.patients, self.config, self.scaling = patients, config, scaling
        self.rng = np.random.default_rng([config.seed, epoch, 5])
        self.x = self.y = None
        for slot in range(config.pool_draws):
            self._make(slot)
            if progress:
                progress(slot + 1, config.pool_draws, "training draws")

    def _make(self, slot: int) -> None:
        p = self.patients[self.rng.integers(len(self.patients))]
        x, t = pyramid(p, self.rng, self.config)
        inside = np.flatnonzero(p.metric)
        n = self.config.voxels_per_draw
        where = self.rng.choice(inside, n, replace=len(inside) < n)
        xv, yv = voxel_rows(x, t, p, where, self.scaling, self.config.lesion_weight)
        if self.x is None:
            self.x = np.zeros((self.config.pool_draws,) + xv.shape[:1] + xv.shape[-1:], np.float32)
            self.y = np.zeros((self.config.pool_draws,) + yv.shape[:1] + yv.shape[-1:], np.float32)
        self.x[slot], self.y[slot] = xv[:, 0, 0, 0], yv[:, 0, 0, 0]

    def refresh(self, n: int) -> None:
        for slot in self.rng.choice(self.config.pool_draws, min(n, self.config.pool_draws), replace=False):
            self._make(int(slot))

    def sample(self, n: int):
        """n voxels of the pool, shuffled, as (n, 1, 1, 1, F) inputs and y_true."""
        rows = self.rng.choice(self.x.shape[0] * self.x.shape[1], min(n, self.x.shape[0] * self.x.shape[1]),
                               replace=False)
        x = self.x.reshape(-1, self.x.shape[-1])[rows]
        y = self.y.reshape(-1, self.y.shape[-1])[rows]
        return x[:, None, None, None, :], y[:, None, None, None, :]


# --- Training -------------------------------------------------------------------------------------------
def train(out: str | Path, config: ContextTrainConfig, resume: bool = False, command: str | None = None,
          verbose: int = 1, progress=None) -> dict:
    """Train the context model and save MODEL.keras + card. Returns the card."""
    import keras

    out = Path(out)
    if out.suffix != ".keras":
        raise InputError(f"--out {out}: a model file must end in .keras.")
    ckpt = out.with_name(out.stem + ".ckpt")
    history_csv = out.with_name(out.stem + ".history.csv")
    started = time.perf_counter()
    state: dict = {}
    config_dict = json.loads(json.dumps({k: v for k, v in dataclasses.asdict(config).items()
                                         if k not in ("epochs", "time_limit_min")}))
    if resume:
        state = fitting.resumed_state(ckpt, config_dict)
    elif ckpt.exists():
        shutil.rmtree(ckpt)
    ckpt.mkdir(parents=True, exist_ok=True)

    def made(seed, n, what, wide=None):
        patients = []
        for i in range(n):
            patients.append(make_patient(seed, i, config, wide))
            if progress:
                progress(i + 1, n, what)
        return patients

    train_patients = made(TRAIN_SEED, config.patients, "train patients")
    validation_patients = made(VALIDATION_SEED, config.validation_patients, "validation patients")
    initial = (fitting.initial_model(config.init_from, config.spec, "context", config.echo_times_ms)
               if config.init_from and not resume else None)
    # a second stage keeps the first stage's output scaling (and input scale), which its weights were trained for
    scaling = state.get("output_scaling") or (initial.card["output_scaling"] if initial
                                              else fit_scaling(train_patients, config.own_protocol))
    state.update(config=config_dict, output_scaling=scaling, wall_before=state.get("wall_so_far", 0.0))

    keras.utils.set_random_seed(config.seed)
    x_val, y_val, val_voxels = [], [], []
    val_rng = np.random.default_rng([VALIDATION_SEED, 1])
    for i, p in enumerate(validation_patients):
        # the model's own echo times for every other patient, a drawn acquisition for the rest
        protocol = config.own_protocol if i % 2 == 0 else config.other_protocol(val_rng)
        x, t = pyramid(p, val_rng, config, VALIDATION_SNRS[i % len(VALIDATION_SNRS)], VALIDATION_QSM_NOISE_PPB,
                       protocol)
        where = np.flatnonzero(p.metric)
        xv, yv = voxel_rows(x, t, p, where, scaling, config.lesion_weight)
        x_val.append(xv)
        y_val.append(yv)
        val_voxels.append(where)
    x_val, y_val = np.concatenate(x_val), np.concatenate(y_val)
    loss = spatial.make_loss(scaling, per_voxel=True)
    pool = VoxelPool(train_patients, config, scaling, state.get("epoch", 0), progress)
    if resume:
        model = keras.saving.load_model(ckpt / "last.keras", custom_objects={loss.__name__: loss}, safe_mode=True)
    else:
        if initial:
            model = initial.model
        else:
            sample = pool.x.reshape(-1, pool.x.shape[-1])[::7]  # the inputs' scale, from the first pool
            model = models.build_context_net(config.spec, x_val.shape[-1], spatial.N_OUTPUTS,
                                             sample.mean(axis=0), sample.std(axis=0) + 1e-6)
        model.compile(optimizer=keras.optimizers.Adam(config.learning_rate, clipnorm=1.0), loss=loss)

    class EpochVoxels(keras.utils.PyDataset):
        """Each epoch: `patients_per_epoch` draws of the pool made anew, then `voxels_per_epoch` voxels of it."""

        def __init__(self):
            super().__init__()
            self.x = self.y = None

        def __len__(self):
            return config.voxels_per_epoch // config.batch_size

        def __getitem__(self, i):
            if self.x is None:  # Keras may peek at batch 0 before the first epoch: that draw serves it
                self.x, self.y = pool.sample(config.voxels_per_epoch)
            rows = slice(i * config.batch_size, (i + 1) * config.batch_size)
            return self.x[rows], self.y[rows]

        def on_epoch_end(self):
            self.x = self.y = None
            pool.refresh(config.patients_per_epoch)

    monitor = _lesion_monitor(x_val, validation_patients, val_voxels, scaling)
    fitting.fit_keeping_best(model, EpochVoxels(), (x_val, y_val), monitor, ckpt, history_csv, config, state,
                                   started, verbose, plateau_patience=5, min_lr=2e-5)
    card = models.make_card(
        config.spec, config.own_protocol, scaling, 1, "centre",
        input_normalisation=dict(sequences.DEFAULT_INPUT_NORMALISATION, **spatial.QSM_FROM_CSF),  # as pyramid()
        spatial={"voxel_size_mm": config.voxel_size_mm, "outputs": list(physics.PARAMETER_NAMES) + [
            "OEF interval below (raw)", "OEF interval above (raw)"], "interval": "90 % (5th-95th percentile)",
            "interval_scale": 1.0},
        window={"length": 1, "target": "centre", "order": "whole volume (Gaussian pyramid, then voxel by voxel)",
                "padding": "zeros"})
    card["supported_protocols"] = config.protocols.to_dict()
    if config.echo_times_ms is not None:
        card["other_protocols"] = (
            "Other echo trains and field strengths whose echoes cover this protocol's span in 3 T-equivalent time "
            "(TE x B0 / 3) are read by resampling their decay to this protocol's echo times (decay.resample_echoes: "
            "basis fit corrected by the voxel's best qBOLD curve); R2 is scaled back by B0 / 3")
    best = state.get("best_epoch")
    card["training"] = {
        "data": "stroke-like virtual patients (phantom.PatientConfig.stroke), 2 mm, whole brains, noise per epoch",
        "train_patients": config.patients, "train_seed": TRAIN_SEED, "validation_patients": config.validation_patients,
        "validation_seed": VALIDATION_SEED, "validation_noise": f"SNR {', '.join(f'{s:g}' for s in VALIDATION_SNRS)}, "
                                                               f"QSM {VALIDATION_QSM_NOISE_PPB:g} ppb",
        "pool_draws": config.pool_draws, "voxels_per_draw": config.voxels_per_draw,
        "draws_remade_per_epoch": config.patients_per_epoch, "voxels_per_epoch": config.voxels_per_epoch,
        "snr_range": list(config.snr_range), "qsm_noise_ppb_range": list(config.qsm_noise_ppb_range),
        "wide_prior_share": config.wide_prior_share, "lesion_free_share": config.lesion_free_share,
        "lesion_weight": config.lesion_weight,
        "init_from": config.init_from, "init_from_sha256": models.sha256_of(config.init_from) if config.init_from else None,
        "protocols": (f"its own echo times for {config.paper_protocol_share:.0%} of draws, else drawn over the "
                      f"supported range ({config.protocols.describe()}) and resampled to them"
                      if config.echo_times_ms is not None else
                      f"the paper's 3 T protocol for {config.paper_protocol_share:.0%} of draws, else drawn over the "
                      f"supported range widened by 10 % ({config.protocols.describe()})"),
        "r2_field_exponent": list(config.r2_field_exponent), "qsm_offset_ppm": config.qsm_offset_ppm,
        "optimizer": f"Adam(learning_rate={config.learning_rate:g}, clipnorm=1), halved on plateaus",
        "loss": "Huber on z-scored parameters (weights S0 .5, R2 .5, Y 2, v 1, chi_nb .5) + pinball 5/95 % on OEF, "
                "per voxel, lesion voxels weighted",
        "batch_size": config.batch_size,
        "best_val_lesions_and_rmse": _read_history(history_csv).get(best, {}) if best else {},
        **fitting.run_record(config, state, started, history_csv, command),
    }
    models.save_bundle(model, card, out)
    # the interval is calibrated through the engine, as the saved model will run (calibration.recalibrate)
    bundle = models.load_bundle(out)
    found = calibration.recalibrate(bundle, config, progress)
    models.write_card(out, dict(bundle.card, spatial=dict(bundle.card["spatial"], **found)))
    return models.read_card(out)


def _lesion_monitor(x_val, patients: list[Patient], voxels: list[np.ndarray], scaling: dict):
    """A callback: val_penumbra and val_core, the lesion contrast recovered on the validation patients,
    and val_oef_rmse (pp, every brain voxel without CSF, unweighted)."""
    import keras

    y_index = physics.PARAMETER_NAMES.index("Y")

    class LesionMonitor(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            z = self.model.predict(x_val, batch_size=8192, verbose=0)[:, 0, 0, 0, y_index]
            oef = 100.0 * (1.0 - (z * scaling["std"][y_index] + scaling["mean"][y_index]) / physics.YA)
            sums = {"misery_perfusion": [0.0, 0.0], "infarct_core": [0.0, 0.0]}
            start, squared = 0, []
            for p, where in zip(patients, voxels):
                pred = np.zeros(p.mask.shape, np.float32)
                pred.reshape(-1)[where] = oef[start:start + len(where)]
                start += len(where)
                truth = 100.0 * (1.0 - p.params[..., 2].astype(np.float32) / physics.YA)
                squared.append((pred.reshape(-1)[where] - truth.reshape(-1)[where]) ** 2)
                labels = np.where(p.metric, p.lesion_map, 0)
                for row in evaluate.lesion_contrast(pred, truth, labels):
                    sums[row["lesion"]][0] += row["pred_contrast_pp"]
                    sums[row["lesion"]][1] += row["true_contrast_pp"]
            logs["val_penumbra"], logs["val_core"] = (s[0] / s[1] if s[1] else math.nan for s in sums.values())
            logs["val_oef_rmse"] = float(np.sqrt(np.mean(np.concatenate(squared))))

    return LesionMonitor()


def _read_history(path: Path) -> dict:
    """epoch (1-based) -> the lesion columns of the history CSV."""
    import csv

    if not path.exists():
        return {}
    with open(path, newline="", encoding="utf-8") as f:
        return {int(r["epoch"]) + 1: {k: round(float(r[k]), 4) for k in ("val_penumbra", "val_core", "val_oef_rmse")
                                      if r.get(k)}
                for r in csv.DictReader(f)}
