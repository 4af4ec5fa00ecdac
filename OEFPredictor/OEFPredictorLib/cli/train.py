"""`oefpredictor train`: train the paper's LSTM (or the DNN / GRU variants) on virtual patients."""
from __future__ import annotations

import shlex
import sys

from ..errors import InputError


def register(sub):
    p = sub.add_parser("train", help="train the LSTM (or DNN/GRU) on simulated patients",
                       description="Train on the training patients of a data set (default P01, P02, P10, "
                                   "P14, P15, P17) with the paper's recipe: Huber loss, Adam 1e-4, batch "
                                   "512, up to 100 epochs, early stopping on the validation loss (8:2 split). "
                                   "Writes MODEL.keras, its card MODEL.json and MODEL.history.csv.")
    p.add_argument("--data", required=True, help="data-set folder made by `oefpredictor simulate`")
    p.add_argument("--out", required=True, help="model file to write (MODEL.keras)")
    p.add_argument("--arch", default="lstm", choices=["lstm", "dnn", "gru"],
                   help="lstm: the paper's model; dnn: the voxelwise MLP baseline; gru: GRU cells")
    p.add_argument("--max-voxels", type=int, default=None,
                   help="random subsample of training voxels, all patients together (default: all)")
    p.add_argument("--epochs", type=int, default=100, help="maximum epochs (default 100)")
    p.add_argument("--batch-size", type=int, default=512, help="batch size (default 512)")
    p.add_argument("--learning-rate", type=float, default=1e-4, help="Adam learning rate (default 1e-4)")
    p.add_argument("--patience", type=int, default=10, help="early-stopping patience in epochs (default 10)")
    p.add_argument("--time-limit-min", type=float, default=None,
                   help="stop after the epoch that would pass this many minutes (CPU budgets)")
    p.add_argument("--seed", type=int, default=0, help="random seed (subsample, split, weights)")
    p.add_argument("--patients", default=None,
                   help="training patients, comma-separated (default P01,P02,P10,P14,P15,P17)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint next to --out")
    p.add_argument("--quiet", action="store_true", help="no per-batch progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    from .. import simulate, train

    patients = simulate.TRAIN_PATIENTS
    if args.patients:
        patients = tuple(p.strip() for p in args.patients.split(",") if p.strip())
        if not patients:
            raise InputError("--patients is empty; give e.g. P01,P02.")
    if args.time_limit_min is not None and args.time_limit_min <= 0:
        raise InputError("--time-limit-min must be positive.")
    config = train.TrainConfig(arch=args.arch, epochs=args.epochs, batch_size=args.batch_size,
                               learning_rate=args.learning_rate, patience=args.patience,
                               max_voxels=args.max_voxels, seed=args.seed, patients=patients,
                               time_limit_min=args.time_limit_min)
    command = "oefpredictor " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    print(f"Training {args.arch} on {', '.join(patients)} from {args.data} ...", file=sys.stderr)
    card = train.train(args.data, args.out, config, resume=args.resume, command=command,
                       verbose=2 if args.quiet else 1)
    t = card["training"]
    print(f"Wrote {args.out} (+ card .json, log .history.csv): {t['epochs_run']} epochs, best "
          f"epoch {t['best_epoch']} (val loss {t['best_val_loss']:.4f}, val RMSE {t['best_val_rmse']:.4f}), "
          f"{t['train_samples']} train / {t['validation_samples']} validation sequences, "
          f"{t['wall_seconds']:.0f} s wall, {t['train_sequences_per_second']:.0f} sequences/s.")
    return 0
