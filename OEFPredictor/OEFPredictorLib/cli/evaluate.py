"""`oefpredictor evaluate`: the paper's accuracy tables (RMSE per patient, mean OEF RMSE) and more."""
from __future__ import annotations

import sys


def _method_names() -> list[str]:
    from .. import evaluate

    return list(evaluate.METHODS)


def register(sub):
    p = sub.add_parser("evaluate", help="accuracy tables of OEF methods on the test patients",
                       description="Evaluate methods on the test patients of a simulated data set (default "
                                   "the paper's 11: P03-P09, P11-P13, P16): RMSE per patient for S0, R2, Y, "
                                   "v, chi_nb and OEF (Tables 2 and 3), bias, the trivial tissue-mean "
                                   "predictor, lesion contrast, wall time. Every method sees the same voxels.")
    p.add_argument("--data", required=True, help="data-set folder made by `oefpredictor simulate`")
    p.add_argument("--model", default=None, help="LSTM model file for method 'lstm' (default: the bundled one)")
    p.add_argument("--dnn-model", default=None, help="model file for method 'dnn' (default: the bundled one)")
    p.add_argument("--unet-model", default=None, help="model file for method 'unet' (default: the bundled one)")
    p.add_argument("--context-model", default=None,
                   help="model file for method 'context' (default: the bundled one)")
    p.add_argument("--methods", default="lstm,tissue_mean",
                   help="comma-separated methods (default lstm,tissue_mean), of: " + ", ".join(_method_names()))
    p.add_argument("--patients", default=None, help="patients to evaluate (default: the test split)")
    p.add_argument("--max-voxels-per-patient", type=int, default=None,
                   help="random subsample of metric-mask voxels per patient (default: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the voxel subsample")
    p.add_argument("--out", default=None, help="folder for CSV + Markdown reports")
    p.add_argument("--title", default=None, help="title of the Markdown report")
    p.add_argument("--record-in-card", action="store_true",
                   help="store the LSTM's average test metrics in its model card")
    p.set_defaults(func=run)


def run(args) -> int:
    from .. import evaluate
    from ..errors import InputError
    from . import progress_bar

    if args.out:  # a file or an unwritable place is refused now, not after the whole evaluation
        from .. import io

        io.check_writable_dir(args.out)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods:
        raise InputError("--methods is empty; e.g. lstm,dnn,tissue_mean.")
    patients = [p.strip() for p in args.patients.split(",")] if args.patients else None
    context = evaluate.MethodContext(args.data, models={"lstm": args.model, "dnn": args.dnn_model,
                                                        "unet": args.unet_model, "context": args.context_model},
                                     seed=args.seed)
    bar = progress_bar(len(patients) if patients else 11, "Evaluating", unit="patient")

    def progress(done, total, pid):
        bar.total = total
        bar.set_postfix_str(pid)
        bar.update(1)

    try:
        ev = evaluate.evaluate(args.data, methods, context, patients, args.max_voxels_per_patient, args.seed,
                               progress)
    finally:
        bar.close()
    sys.stdout.write(evaluate.markdown(ev, args.title))
    if args.out:
        files = evaluate.write_reports(ev, args.out, args.title)
        print(f"\nWrote {', '.join(f.name for f in files)} to {args.out}.")
    if args.record_in_card and "lstm" in methods:
        from .. import models, resources

        path = args.model or resources.bundled_model_path("lstm")
        evaluate.record_in_card(ev, path, "lstm")
        print(f"Recorded the LSTM's test metrics in {models.card_path_for(path)}.")
    return 0
