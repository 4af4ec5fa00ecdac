"""Training the paper's LSTM (and the DNN / GRU variants) on virtual patients.

The paper's recipe: Huber loss, Adam (learning rate 1e-4), batch 512, at most 100 epochs, early
stopping on the validation loss with the best weights restored, an 8:2 train/validation split of
the voxels of the training patients (P01, P02, P10, P14, P15, P17), RMSE as the metric.

Samples are the voxels of the metric mask (brain without CSF) of the training patients, optionally a
random subsample (CPU machines). Windows run over the in-mask voxel list (CSF included, as at
inference) and are built per batch from a compact features array, so memory stays bounded by the
features (9 floats per brain voxel), never a whole brain of windows.

Outputs next to MODEL.keras: the model card MODEL.json, the per-epoch log MODEL.history.csv (the
paper's Table 1), and the checkpoint folder MODEL.ckpt/ (last and best epoch, resume state) that
`--resume` continues from, after an interruption or with a higher --epochs; delete it when done.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np

from .. import models, physics, sequences, simulate
from ..errors import InputError
from .fitting import epoch_callbacks

ARCHITECTURES = {
    "lstm": models.PAPER_LSTM,
    "gru": dict(models.PAPER_LSTM, cell="gru"),
    "dnn": models.PAPER_DNN,
}


@dataclasses.dataclass
class TrainConfig:
    """Everything that defines a training run (recorded in the model card)."""

    arch: str = "lstm"
    epochs: int = 100
    batch_size: int = 512
    learning_rate: float = 1e-4
    patience: int = 10
    validation_fraction: float = 0.2
    max_voxels: int | None = None  # random subsample of training voxels (all patients together)
    seed: int = 0
    patients: tuple[str, ...] = simulate.TRAIN_PATIENTS
    window_target: str = "centre"
    time_limit_min: float | None = None  # stop after the epoch that would pass this budget
    custom_spec: dict | None = None  # a models.build_model spec instead of --arch (experiments, tests)

    @property
    def spec(self) -> dict:
        if self.custom_spec is not None:
            return dict(self.custom_spec)
        if self.arch not in ARCHITECTURES:
            raise InputError(f"--arch must be one of {', '.join(ARCHITECTURES)}, got {self.arch!r}.")
        return dict(ARCHITECTURES[self.arch])

    @property
    def window_length(self) -> int:
        # the DNN is voxelwise: a window of one voxel
        return 1 if self.spec["architecture"] == "mlp" else sequences.WINDOW_LENGTH


@dataclasses.dataclass
class SampleSet:
    """Features of all loaded brains, concatenated, and the samples drawn from them.

    features: (V, F) every in-mask voxel of every patient, patient after patient.
    centre / lo / hi: (N,) per sample, the global row of its target voxel and its patient's rows
    [lo, hi] (windows are edge-padded inside their own patient).
    raw_targets: (N, 5) S0 / S(TE1), R2, Y, v, chi_nb.
    """

    features: np.ndarray
    centre: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    raw_targets: np.ndarray
    protocol: physics.Protocol
    patients: list[str]
    voxels_per_patient: dict[str, int]

    def __len__(self) -> int:
        return len(self.centre)

    def windows(self, rows: np.ndarray, length: int, target: str) -> np.ndarray:
        idx = self.centre[rows][:, None] + sequences.window_offsets(length, target)[None, :]
        idx = np.clip(idx, self.lo[rows][:, None], self.hi[rows][:, None])
        return self.features[idx]


def raw_targets_of(truth: dict, echo1: np.ndarray) -> np.ndarray:
    """Truth parameters -> (N, 5) unscaled targets (S0 relative to echo 1)."""
    return np.stack([truth["S0"] / echo1 if n == "S0" else truth[n] for n in physics.PARAMETER_NAMES],
                    axis=1).astype(np.float32)


def gather_samples(dataset: str | Path, patients=simulate.TRAIN_PATIENTS, max_voxels: int | None = None,
                   seed: int = 0, qsm_scale: float = sequences.DEFAULT_INPUT_NORMALISATION["qsm_scale"],
                   progress=None) -> SampleSet:
    """Load the training patients and draw the (optionally subsampled) target voxels."""
    folders = {p.name: p for p in simulate.list_patients(dataset)}
    missing = [p for p in patients if p not in folders]
    if missing:
        raise InputError(f"{dataset} has no patient(s) {', '.join(missing)}; it holds "
                         f"{', '.join(folders) or 'none'}.")
    features, centre, lo, hi, targets, counts = [], [], [], [], [], {}
    protocol = None
    offset = 0
    for n, pid in enumerate(patients):
        data = simulate.load_patient(folders[pid])
        if protocol is None:
            protocol = data.protocol
        elif not data.protocol.matches(protocol):
            raise InputError(f"{pid}: protocol {data.protocol.describe()} differs from "
                             f"{patients[0]}'s ({protocol.describe()}); train on one protocol.")
        mask = data.mask
        feats, echo1 = sequences.voxel_features(data.echoes[mask], data.qsm[mask], qsm_scale)
        usable = np.isfinite(feats).all(axis=1)
        feats = np.nan_to_num(feats)  # a bad neighbour must not poison its windows
        pos = np.flatnonzero(data.metric_mask[mask] & usable)
        truth = {k: data.truth[k][mask][pos] for k in physics.PARAMETER_NAMES}
        features.append(feats)
        centre.append(pos + offset)
        lo.append(np.full(len(pos), offset))
        hi.append(np.full(len(pos), offset + len(feats) - 1))
        targets.append(raw_targets_of(truth, echo1[pos]))
        counts[pid] = len(pos)
        offset += len(feats)
        if progress:
            progress(n + 1, len(patients), pid)
    s = SampleSet(np.concatenate(features), np.concatenate(centre), np.concatenate(lo), np.concatenate(hi),
                  np.concatenate(targets), protocol, list(patients), counts)
    if max_voxels is not None and max_voxels < len(s):
        keep = np.sort(np.random.default_rng(seed).choice(len(s), max_voxels, replace=False))
        s.centre, s.lo, s.hi, s.raw_targets = s.centre[keep], s.lo[keep], s.hi[keep], s.raw_targets[keep]
    return s


def split_rows(n: int, validation_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random voxel-level train / validation split (the paper splits samples 8:2)."""
    order = np.random.default_rng([seed, 1]).permutation(n)
    n_val = int(round(n * validation_fraction))
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def make_sequence(samples: SampleSet, rows: np.ndarray, targets: np.ndarray, batch_size: int,
                  length: int, target: str, shuffle: bool, seed: int):
    """A keras.utils.PyDataset that builds each batch's windows on demand."""
    import keras

    class WindowBatches(keras.utils.PyDataset):
        def __init__(self):
            super().__init__()
            self.rng = np.random.default_rng([seed, 2])
            self.order = np.arange(len(rows))
            if shuffle:
                self.rng.shuffle(self.order)

        def __len__(self):
            return math.ceil(len(rows) / batch_size)

        def __getitem__(self, i):
            pick = self.order[i * batch_size:(i + 1) * batch_size]
            return samples.windows(rows[pick], length, target), targets[rows[pick]]

        def on_epoch_end(self):
            if shuffle:
                self.rng.shuffle(self.order)

    return WindowBatches()


def compile_model(model, learning_rate: float):
    import keras

    model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss=keras.losses.Huber(),
                  metrics=[keras.metrics.RootMeanSquaredError(name="rmse")])


def train(dataset: str | Path, out: str | Path, config: TrainConfig, resume: bool = False,
          command: str | None = None, verbose: int = 1, progress=None) -> dict:
    """Train a model on the data set's training patients and save MODEL.keras + card. Returns the card."""
    import keras

    out = Path(out)
    if out.suffix != ".keras":
        raise InputError(f"--out {out}: a model file must end in .keras.")
    if config.epochs < 1 or config.batch_size < 1:
        raise InputError("--epochs and --batch-size must be at least 1.")
    if config.max_voxels is not None and config.max_voxels < 10:
        raise InputError(f"--max-voxels {config.max_voxels} is too few to train and validate on.")
    spec, length = config.spec, config.window_length
    ckpt = out.with_name(out.stem + ".ckpt")
    history_csv = out.with_name(out.stem + ".history.csv")
    started = time.perf_counter()

    state: dict = {}
    if resume:
        if not (ckpt / "state.json").exists() or not (ckpt / "last.keras").exists():
            raise InputError(f"--resume: no checkpoint in {ckpt}; start without --resume.")
        state = json.loads((ckpt / "state.json").read_text(encoding="utf-8"))
        if state["config"] != _config_dict(config, ignore_epochs=True):
            raise InputError(f"--resume: the options differ from the checkpointed run ({ckpt}/state.json); "
                             "use the same --arch, --max-voxels, --seed, --patients, --batch-size.")
    elif ckpt.exists():
        shutil.rmtree(ckpt)
    ckpt.mkdir(parents=True, exist_ok=True)
    out.parent.mkdir(parents=True, exist_ok=True)

    keras.utils.set_random_seed(config.seed)
    samples = gather_samples(dataset, config.patients, config.max_voxels, config.seed, progress=progress)
    train_rows, val_rows = split_rows(len(samples), config.validation_fraction, config.seed)
    # output scaling from the training rows only; kept in the resume state so it never changes
    scaling = state.get("output_scaling") or models.fit_output_scaling(samples.raw_targets[train_rows])
    mean, std = np.array(scaling["mean"], np.float32), np.array(scaling["std"], np.float32)
    targets = ((samples.raw_targets - mean) / std).astype(np.float32)
    state.update(config=_config_dict(config, ignore_epochs=True), output_scaling=scaling,
                 wall_before=state.get("wall_so_far", 0.0))

    if resume:
        model = keras.saving.load_model(ckpt / "last.keras", safe_mode=True)
    else:
        model = models.build_model(spec, window_length=length, n_features=samples.features.shape[1])
        compile_model(model, config.learning_rate)
    train_seq = make_sequence(samples, train_rows, targets, config.batch_size, length, config.window_target,
                              True, config.seed)
    val_seq = make_sequence(samples, val_rows, targets, config.batch_size, length, config.window_target,
                            False, config.seed)
    initial_epoch = state.get("epoch", 0)
    if initial_epoch < config.epochs:
        model.fit(train_seq, validation_data=val_seq, epochs=config.epochs, initial_epoch=initial_epoch,
                  callbacks=epoch_callbacks(ckpt, history_csv, config, state, started), verbose=verbose)
    if not (ckpt / "best.keras").exists():  # no epoch ever gave a finite validation loss
        raise InputError("Training diverged: the validation loss never became finite. Lower --learning-rate "
                         "or check the training data.")
    best = keras.saving.load_model(ckpt / "best.keras", compile=False, safe_mode=True)

    wall = time.perf_counter() - started + state.get("wall_before", 0.0)
    description = _dataset_description(dataset)
    epochs_run = state.get("epoch", 0)
    card = models.make_card(
        spec, samples.protocol, scaling, length, config.window_target,
        training={
            "dataset": str(dataset), "dataset_seed": description.get("Seed"), "snr": description.get("SNR"),
            "qsm_noise_ppb": description.get("QSMNoisePPB"), "voxel_size_mm": description.get("VoxelSizeMM"),
            "patients": list(config.patients), "voxels_per_patient": samples.voxels_per_patient,
            "voxels_available": int(sum(samples.voxels_per_patient.values())),
            "voxels_used": len(samples), "train_samples": len(train_rows), "validation_samples": len(val_rows),
            "max_voxels": config.max_voxels, "seed": config.seed, "batch_size": config.batch_size,
            "optimizer": f"Adam(learning_rate={config.learning_rate:g})", "loss": "Huber(delta=1)",
            "early_stopping": f"val_loss, patience {config.patience}, best weights restored",
            "epochs_max": config.epochs, "epochs_run": epochs_run, "best_epoch": state.get("best_epoch"),
            "best_val_loss": state.get("best_val_loss"), "best_val_rmse": state.get("best_val_rmse"),
            "stopped_by": state.get("stopped_by", "early stopping" if epochs_run < config.epochs else "epochs"),
            "train_seconds": round(state.get("train_seconds", 0.0), 1), "wall_seconds": round(wall, 1),
            "train_sequences_per_second": round(len(train_rows) * epochs_run / max(state.get("train_seconds", 0.0), 1e-9), 1),
            "history": history_csv.name, "command": command,
            "metric_mask": "brain mask without CSF",
        })
    models.save_bundle(best, card, out)  # the checkpoint stays: --resume with more --epochs continues
    return models.read_card(out)


def _config_dict(config: TrainConfig, ignore_epochs: bool = False) -> dict:
    d = dataclasses.asdict(config)
    d["patients"] = list(d["patients"])
    if ignore_epochs:  # --resume may raise the epoch cap or the time budget
        d.pop("epochs")
        d.pop("time_limit_min")
    return d


def _dataset_description(dataset) -> dict:
    path = Path(dataset) / "dataset_description.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def read_history(path: str | Path) -> list[dict]:
    """The per-epoch log (epoch, loss, rmse, val_loss, val_rmse, seconds) as dicts of floats."""
    with open(path, newline="", encoding="utf-8") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]
