"""`oefpredictor train`: train a spatial model (the context network, the default method, or the
experimental U-Net) on stroke-like patients made on the fly, or the paper's LSTM (or the DNN / GRU
variants) on a simulated data set."""
from __future__ import annotations

import shlex
import sys

from ..errors import InputError


def register(sub):
    p = sub.add_parser("train", help="train a spatial model (context, unet), or the paper's LSTM (or DNN/GRU)",
                       description="--arch context / unet: a spatial model on stroke-like virtual patients made "
                                   "on the fly (no --data), new noise every epoch, interval calibrated on held-out "
                                   "patients. --arch lstm/dnn/gru: the training patients of a data set "
                                   "(default P01, P02, P10, P14, P15, P17) with the paper's recipe: Huber loss, "
                                   "Adam 1e-4, batch 512, up to 100 epochs, early stopping on the validation "
                                   "loss (8:2 split). Writes MODEL.keras, its card MODEL.json and "
                                   "MODEL.history.csv; MODEL.ckpt/ holds what --resume continues from.")
    p.add_argument("--data", default=None, help="data-set folder made by `oefpredictor simulate` (lstm/dnn/gru)")
    p.add_argument("--out", required=True, help="model file to write (MODEL.keras)")
    p.add_argument("--arch", default="lstm", choices=["context", "unet", "lstm", "dnn", "gru"],
                   help="context: the spatial context network (the product's default method); unet: the "
                        "experimental spatial U-Net; lstm: the paper's model; dnn: the voxelwise MLP baseline; "
                        "gru: GRU cells")
    p.add_argument("--max-voxels", type=int, default=None,
                   help="random subsample of training voxels, all patients together (default: all)")
    p.add_argument("--epochs", type=int, default=None, help="maximum epochs (default 100; context 300; unet 400)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="batch size (default 512; context 1024 voxels; unet 3 patches)")
    p.add_argument("--learning-rate", type=float, default=None,
                   help="Adam learning rate (default 1e-4; context and unet 5e-4)")
    p.add_argument("--patience", type=int, default=None,
                   help="early-stopping patience in epochs (default 10; context 15; unet 12)")
    p.add_argument("--n-patients", type=int, default=None,
                   help="context / unet: training patients to make (default 64 / 96; more on a GPU)")
    p.add_argument("--steps-per-epoch", type=int, default=None, help="unet: batches per epoch (default 150)")
    p.add_argument("--lesion-weight", type=float, default=None,
                   help="context / unet: loss weight of lesion voxels, the rest of the brain counts 1 (default 3 / 4)")
    p.add_argument("--lesion-patch-share", type=float, default=None,
                   help="unet: share of training patches centred on a lesion voxel (default 0.6)")
    p.add_argument("--init-from", default=None,
                   help="context / unet: start from the weights of this earlier model of the same architecture (and, for a "
                        "context network, the same --echo-times): a second training stage with other settings")
    p.add_argument("--echo-times", default=None,
                   help="context: echo times in ms (comma-separated, at 3 T) to bind the network to; it then reads "
                        "any echo train covering their span in 3 T-equivalent time (the first echo up to 4 ms late) by "
                        "resampling, as the bundled context models do (default: a protocol-free network)")
    p.add_argument("--pool-draws", type=int, default=None,
                   help="context: noisy draws (a patient at an acquisition) whose voxels an epoch samples (default 24)")
    p.add_argument("--voxels-per-draw", type=int, default=None, help="context: voxels sampled per draw (default 10000)")
    p.add_argument("--draws-per-epoch", type=int, default=None,
                   help="context: draws of the pool made anew after each epoch (default 24: all)")
    p.add_argument("--voxels-per-epoch", type=int, default=None,
                   help="context: voxels an epoch samples from the pool (default 240000)")
    p.add_argument("--own-protocol-share", type=float, default=None,
                   help="context: share of draws at the network's own echo times (the paper's for a protocol-free "
                        "network); the rest at protocols drawn over the supported range (default 0.15)")
    p.add_argument("--snr-range", default=None,
                   help="context: training SNR range, LO,HI, drawn log-uniformly (default 18,250)")
    p.add_argument("--lesion-free-share", type=float, default=None,
                   help="context: share of training patients without lesions (default 0.3)")
    p.add_argument("--qsm-offset-ppm", type=float, default=None,
                   help="context: constant QSM offsets drawn within +-this, another pipeline's reference (default 0.06)")
    p.add_argument("--time-limit-min", type=float, default=None,
                   help="stop after the epoch that would pass this many minutes (CPU budgets)")
    p.add_argument("--seed", type=int, default=0, help="random seed (subsample, split, weights)")
    p.add_argument("--patients", default=None,
                   help="training patients, comma-separated (default P01,P02,P10,P14,P15,P17)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint next to --out")
    p.add_argument("--quiet", action="store_true", help="no per-batch progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    if args.time_limit_min is not None and args.time_limit_min <= 0:
        raise InputError("--time-limit-min must be positive.")
    if args.arch in ("context", "unet"):
        return run_spatial(args)
    if args.data is None:
        raise InputError(f"--arch {args.arch} trains on a data set: give --data (made by `oefpredictor simulate`).")
    from .. import simulate
    from ..training import lstm as train

    defaults = train.TrainConfig()
    for name in ("epochs", "batch_size", "learning_rate", "patience"):
        if getattr(args, name) is None:
            setattr(args, name, getattr(defaults, name))

    patients = simulate.TRAIN_PATIENTS
    if args.patients:
        patients = tuple(p.strip() for p in args.patients.split(",") if p.strip())
        if not patients:
            raise InputError("--patients is empty; give e.g. P01,P02.")
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


# the options of --arch context that --arch unet refuses (argparse destinations)
CONTEXT_ONLY = ("echo_times", "pool_draws", "voxels_per_draw", "draws_per_epoch", "voxels_per_epoch",
                "own_protocol_share", "snr_range", "lesion_free_share", "qsm_offset_ppm")


def run_spatial(args) -> int:
    """--arch context / unet: options left out keep the trainer config's defaults (the README gives the
    options that made the bundled context network)."""
    import dataclasses

    from ..physics import parse_echo_times_ms
    from ..training import context as train_context, unet as train_spatial
    from . import progress_bar

    if args.data is not None:
        print(f"Note: --arch {args.arch} makes its own stroke-like training patients; --data is not used.",
              file=sys.stderr)
    given = {"epochs": args.epochs, "batch_size": args.batch_size, "learning_rate": args.learning_rate,
             "patience": args.patience, "patients": args.n_patients, "seed": args.seed,
             "lesion_weight": args.lesion_weight, "init_from": args.init_from}
    if args.arch == "unet":
        context_only = ["--" + name.replace("_", "-") for name in CONTEXT_ONLY if getattr(args, name) is not None]
        if context_only:
            raise InputError(f"{context_only[0]} is an option of --arch context; --arch unet does not take it.")
        trainer, defaults = train_spatial, train_spatial.SpatialTrainConfig()
        given.update(steps_per_epoch=args.steps_per_epoch, lesion_patch_share=args.lesion_patch_share)
    else:
        unused = [o for o, v in (("--steps-per-epoch", args.steps_per_epoch),
                                 ("--lesion-patch-share", args.lesion_patch_share)) if v is not None]
        if unused:
            raise InputError(f"{unused[0]} is an option of --arch unet; --arch context does not take it.")
        trainer, defaults = train_context, train_context.ContextTrainConfig()
        given.update(pool_draws=args.pool_draws, voxels_per_draw=args.voxels_per_draw,
                     patients_per_epoch=args.draws_per_epoch, voxels_per_epoch=args.voxels_per_epoch,
                     paper_protocol_share=args.own_protocol_share, lesion_free_share=args.lesion_free_share,
                     qsm_offset_ppm=args.qsm_offset_ppm)
        shares = [args.own_protocol_share, args.lesion_free_share]
        if any(v is not None and not 0.0 <= v <= 1.0 for v in shares) or (args.qsm_offset_ppm or 0.0) < 0:
            raise InputError("--own-protocol-share and --lesion-free-share must lie within 0-1, "
                             "and --qsm-offset-ppm must not be negative.")
        if args.snr_range:
            try:
                low, high = (float(v) for v in args.snr_range.split(","))
            except ValueError:
                raise InputError(f"--snr-range takes LO,HI (e.g. 18,250); got {args.snr_range!r}.") from None
            if not 0 < low <= high:
                raise InputError(f"--snr-range needs 0 < LO <= HI; got {args.snr_range!r}.")
            given["snr_range"] = (low, high)
        if args.echo_times:
            try:
                given["echo_times_ms"] = tuple(parse_echo_times_ms(args.echo_times))
            except ValueError as exc:
                raise InputError(f"--echo-times: {exc}") from None
    if args.time_limit_min is not None:
        given["time_limit_min"] = args.time_limit_min
    config = dataclasses.replace(defaults, **{k: v for k, v in given.items() if v is not None})
    if config.patients < 1 or config.batch_size < 1 or config.epochs < 1:
        raise InputError("--n-patients, --batch-size and --epochs must be at least 1.")
    if config.lesion_weight <= 0 or not 0.0 <= getattr(config, "lesion_patch_share", 0.0) <= 1.0:
        raise InputError("--lesion-weight must be positive and --lesion-patch-share within 0-1.")
    command = "oefpredictor " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    bars = {}

    def progress(done, total, what):
        bar = bars.get(what)
        if bar is None:
            bar = bars[what] = progress_bar(total, what.capitalize(), unit="patient")
        bar.n = done
        bar.refresh()
        if done >= total:
            bar.close()

    card = trainer.train(args.out, config, resume=args.resume, command=command,
                         verbose=2 if args.quiet else 1, progress=progress)
    t, info = card["training"], card["spatial"]
    print(f"Wrote {args.out} (+ card .json, log .history.csv): {t['epochs_run']} epochs, best epoch "
          f"{t['best_epoch']} (val loss {t['best_val_loss']:.4f}), {t['train_patients']} training patients, "
          f"{t['wall_seconds']:.0f} s wall; interval calibrated on {info['calibration']['patients']} calibration "
          "patients (90 %).")
    return 0
