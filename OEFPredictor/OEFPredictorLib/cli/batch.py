"""`oefpredictor batch BIDS_DIR OUTPUT_DIR [participant|group]`: OEF maps of a cohort (BIDS-App
style) on a dask.distributed cluster; see OEFPredictorLib.cohort for the outputs."""
from __future__ import annotations

import sys
import time
from pathlib import Path

from ..errors import InputError


def register(sub):
    p = sub.add_parser(
        "batch", help="OEF maps of every subject of a BIDS data set (Dask; BIDS-App style)",
        description="Predict OEF maps for every subject (and session) of a BIDS data set, one Dask task per "
                    "subject, on a local cluster of worker processes or an existing Dask scheduler. Writes a "
                    "BIDS derivatives data set with a cohort table; a rerun skips subjects whose inputs and "
                    "model are unchanged. Exit code 1 if any subject failed.")
    p.add_argument("bids_dir", metavar="BIDS_DIR", help="the raw BIDS data set (with dataset_description.json)")
    p.add_argument("output_dir", metavar="OUTPUT_DIR",
                   help="the derivatives folder to write (new, empty, or an earlier batch output to resume)")
    p.add_argument("analysis_level", nargs="?", default="participant", choices=("participant", "group"),
                   help="participant (default): predict the subjects, then the cohort table; group: rebuild "
                        "only the cohort table and figure from OUTPUT_DIR")
    p.add_argument("--participant-label", nargs="+", metavar="LABEL",
                   help="only these subjects (01 or sub-01); default: all")
    p.add_argument("--derivatives", nargs="+", metavar="DIR", default=[],
                   help="BIDS derivatives folders holding the QSM (*_Chimap), brain mask (*_desc-brain_mask) "
                        "or segmentation (*_dseg + dseg.tsv) when they are not in the subjects' anat/")
    p.add_argument("--method", default=None,
                   help="prediction method (default: predict's default); see oefpredictor predict --help")
    p.add_argument("--model", metavar="FILE", help="a .keras model with its .json card (default: bundled)")
    p.add_argument("--device", choices=("auto", "cpu", "gpu"), default="cpu",
                   help="device of each worker (default cpu)")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="worker processes of the local cluster, one thread each (default: the CPU cores, at "
                        "most one per subject)")
    p.add_argument("--memory-limit", default="auto", metavar="SIZE",
                   help="memory limit per local worker, e.g. 4GiB (default auto: the machine's memory / N); a "
                        "subject that exceeds it fails with that reason")
    p.add_argument("--scheduler", metavar="tcp://HOST:PORT",
                   help="run on an existing Dask cluster (its workers must see BIDS_DIR and OUTPUT_DIR at the "
                        "same paths) instead of a local one")
    p.set_defaults(func=run)


def run(args) -> int:
    import os

    from .. import bids, cohort, predict
    from . import progress_bar

    start = time.perf_counter()
    bids_dir, out = Path(args.bids_dir).absolute(), Path(args.output_dir).absolute()
    if args.analysis_level == "group":
        cohort.prepare_output(out, bids_dir, None)
        if not (out / "dataset_description.json").exists():
            raise InputError(f"{out} is not a batch output (no dataset_description.json); run the participant "
                             "level first.")
        rows, table, figure = cohort.write_group(out)
        failed = [r for r in rows if r.get("status") != cohort.STATUS_OK]
        print(f"Cohort table of {len(rows)} subject(s) ({len(failed)} failed) written to {table}"
              + (f" and {figure.name}" if figure else "") + ".")
        return 1 if failed else 0

    if args.workers is not None and args.workers < 1:
        raise InputError(f"--workers must be 1 or more, got {args.workers}.")
    # predict's rule: --method, else the method the --model file was trained for, else the default
    method = predict.resolve_method(args.method, args.model)[0].name
    model_file, model_sha = cohort.model_identity(method, args.model)
    config = cohort.BatchConfig(str(out), str(bids_dir), method, model_file, model_sha, args.device)
    cohort.prepare_output(out, bids_dir, None)  # before any work (indexing a large data set takes time)
    layout = bids.open_layout(bids_dir, [Path(d).absolute() for d in args.derivatives])
    units = bids.find_inputs(layout, args.participant_label)
    for unit in units:
        if unit.missing:
            sys.stderr.write(f"oefpredictor batch: {unit.name}: missing {'; '.join(unit.missing)}\n")
    cohort.prepare_output(out, bids_dir, config)
    workers = args.workers or max(1, min(os.cpu_count() or 1, len(units)))
    client, cluster = cohort.start_client(workers, args.scheduler, args.memory_limit)
    bar = progress_bar(len(units), "Subjects", unit="subject")

    def on_row(row):
        bar.update(1)
        if row["status"] == cohort.STATUS_FAILED:
            bar.write(f"oefpredictor batch: {row['name']}: failed: {row['reason']}", file=sys.stderr)

    try:
        rows = cohort.run_units(units, config, client, on_row)
    finally:
        bar.close()
        client.close()
        if cluster is not None:
            cluster.close()
    _, table, figure = cohort.write_group(out)
    failed = [r for r in rows if r["status"] == cohort.STATUS_FAILED]
    skipped = [r for r in rows if r.get("skipped")]
    where = f"on {args.scheduler}" if args.scheduler else f"on {workers} local worker(s)"
    print(f"{len(rows)} subject(s) {where} in {time.perf_counter() - start:.1f} s: "
          f"{len(rows) - len(failed) - len(skipped)} done, {len(skipped)} unchanged (skipped), {len(failed)} failed"
          + (f" ({', '.join(r['name'] for r in failed)})" if failed else "")
          + f". Maps in {out}/sub-*; cohort table {table.name}" + (f", figure {figure.name}" if figure else "") + ".")
    return 1 if failed else 0
