"""Fitting with bookkeeping, shared by every trainer: the epoch log, the resume state, the time budget,
early stopping, last/best checkpoints, and the card's account of the run.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

from .. import models
from ..errors import InputError


def epoch_callbacks(ckpt: Path, history_csv: Path, config, state: dict, started: float):
    """The epoch log (CSV), resume state, time budget, early stopping and last/best checkpoints."""
    import keras

    class EpochBookkeeping(keras.callbacks.Callback):
        """Epoch wall time into the log, the resume state, and the optional time budget."""

        def on_epoch_begin(self, epoch, logs=None):
            self.t0 = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            logs["seconds"] = time.perf_counter() - self.t0
            state["epoch"] = epoch + 1
            state["train_seconds"] = state.get("train_seconds", 0.0) + logs["seconds"]
            state["wall_so_far"] = state.get("wall_before", 0.0) + time.perf_counter() - started
            if logs["val_loss"] < state.get("best_val_loss", math.inf):
                state.update(best_val_loss=float(logs["val_loss"]), best_val_rmse=float(logs.get("val_rmse", math.nan)),
                             best_epoch=epoch + 1, wait=0)
            else:
                state["wait"] = state.get("wait", 0) + 1
            if config.time_limit_min is not None:
                elapsed = time.perf_counter() - started
                # stop if one more epoch like this one would pass the budget
                if elapsed + logs["seconds"] > config.time_limit_min * 60:
                    state["stopped_by"] = "time limit"
                    self.model.stop_training = True

    class ResumableEarlyStopping(keras.callbacks.EarlyStopping):
        """EarlyStopping that continues its patience count and best value after --resume."""

        def on_train_begin(self, logs=None):
            super().on_train_begin(logs)
            if "best_val_loss" in state:
                self.best, self.wait = state["best_val_loss"], state.get("wait", 0)

    class SaveState(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            (ckpt / "state.json").write_text(json.dumps(state, indent=2), encoding="utf-8")

    return [
        EpochBookkeeping(),
        keras.callbacks.CSVLogger(str(history_csv), append=state.get("epoch", 0) > 0),
        # last.keras (with the optimizer) to resume from, best.keras = the weights we ship
        keras.callbacks.ModelCheckpoint(str(ckpt / "last.keras")),
        keras.callbacks.ModelCheckpoint(str(ckpt / "best.keras"), monitor="val_loss", save_best_only=True,
                                        initial_value_threshold=state.get("best_val_loss")),
        # restore_best_weights=False: best.keras is reloaded at the end, which also works across resumes
        ResumableEarlyStopping(monitor="val_loss", patience=config.patience),
        SaveState(),
    ]


def resumed_state(ckpt: Path, config_dict: dict) -> dict:
    """The resume state of the run checkpointed in `ckpt`, refused in one line when there is none or it was
    made with other options."""
    if not (ckpt / "state.json").exists() or not (ckpt / "last.keras").exists():
        raise InputError(f"--resume: no checkpoint in {ckpt}; start without --resume.")
    state = json.loads((ckpt / "state.json").read_text(encoding="utf-8"))
    if state["config"] != config_dict:
        raise InputError(f"--resume: the options differ from the checkpointed run ({ckpt}/state.json).")
    return state


def fit_keeping_best(model, batches, validation, monitor, ckpt: Path, history_csv: Path, config, state: dict,
                     started: float, verbose: int, plateau_patience: int, min_lr: float) -> None:
    """Fit (or continue) with the voxel trainer's bookkeeping (epoch log, resume state, time budget,
    early stopping), last/best checkpoints and a halved learning rate on plateaus; then load the
    best epoch's weights. The lesion monitor runs first, so that its numbers reach the epoch log."""
    import keras

    callbacks = [monitor] + [c for c in epoch_callbacks(ckpt, history_csv, config, state, started)
                             if not isinstance(c, keras.callbacks.ModelCheckpoint)]
    callbacks += [save_models(ckpt, state),
                  keras.callbacks.ReduceLROnPlateau(factor=0.5, patience=plateau_patience, min_lr=min_lr)]
    initial_epoch = state.get("epoch", 0)
    if initial_epoch < config.epochs:
        model.fit(batches, validation_data=validation, batch_size=config.batch_size, epochs=config.epochs,
                  initial_epoch=initial_epoch, callbacks=callbacks, verbose=verbose)
    if not (ckpt / "best.weights.h5").exists():
        raise InputError("Training diverged: the validation loss never became finite. Lower --learning-rate.")
    model.load_weights(ckpt / "best.weights.h5")


def save_models(ckpt: Path, state: dict):
    """A callback: last.keras (with the optimizer) to resume from; best.weights.h5 for the epoch we ship."""
    import keras

    class SaveModels(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            self.model.save(ckpt / "last.keras")
            if state.get("best_epoch") == epoch + 1:
                self.model.save_weights(ckpt / "best.weights.h5")

    return SaveModels()


def run_record(config, state: dict, started: float, history_csv: Path, command: str | None) -> dict:
    """The card's account of the run itself: epochs, the best one, why it stopped, time, seed, command."""
    epochs_run = state.get("epoch", 0)
    return {"epochs_run": epochs_run, "best_epoch": state.get("best_epoch"), "best_val_loss": state.get("best_val_loss"),
            "stopped_by": state.get("stopped_by", "early stopping" if epochs_run < config.epochs else "epochs"),
            "train_seconds": round(state.get("train_seconds", 0.0), 1),
            "wall_seconds": round(time.perf_counter() - started + state.get("wall_before", 0.0), 1),
            "seed": config.seed, "history": history_csv.name, "command": command}


def initial_model(path: str, spec: dict, arch: str, echo_times_ms=None):
    """An earlier spatial model of the same architecture (and echo times, for a bound context network) whose
    weights a second training stage starts from (its bundle: weights and card); refused in one line otherwise."""
    bundle = models.load_bundle(path)
    same = "spatial" in bundle.card and bundle.card.get("model") == spec
    if same and echo_times_ms is not None:
        same = [round(t, 6) for t in bundle.card["protocol"]["echo_times_ms"]] == [round(t, 6) for t in echo_times_ms]
    if not same:
        raise InputError(f"--init-from {path}: not a spatial model with this architecture and these echo times; train "
                         f"from scratch or pass a model made by `train --arch {arch}` with the same options.")
    return bundle
