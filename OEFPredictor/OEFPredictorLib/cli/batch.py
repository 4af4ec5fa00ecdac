"""`oefpredictor batch BIDS_DIR OUTPUT_DIR [participant|group]`: OEF maps of a cohort (BIDS-App
style) on a dask.distributed cluster; see OEFPredictorLib.cohort for the outputs."""
from __future__ import annotations

import logging
import signal
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
    p.add_argument("--field-strength", type=float, metavar="T",
                   help="B0 field strength in tesla, for every subject (overrides the sidecars); default: "
                        "MagneticFieldStrength of each subject's MEGRE sidecars. Never assumed: a subject without "
                        "it fails with that reason")
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
    p.add_argument("--no-worker-timeout", type=float, default=None, metavar="S",
                   help="end the run when the cluster has had no worker for S seconds (default 120); the "
                        "finished subjects are kept, a rerun resumes")
    p.set_defaults(func=run)


def run(args) -> int:
    from .. import cohort

    start = time.perf_counter()
    bids_dir, out = Path(args.bids_dir).absolute(), Path(args.output_dir).absolute()
    if args.analysis_level == "group":
        cohort.prepare_output(out, bids_dir, None)
        if not (out / "dataset_description.json").exists():
            raise InputError(f"{out} is not a batch output (no dataset_description.json); run the participant "
                             "level first.")
        with cohort.output_lock(out):
            rows, table, figure = cohort.write_group(out)
        failed = [r for r in rows if r.get("status") != cohort.STATUS_OK]
        print(f"Cohort table of {len(rows)} subject(s) ({len(failed)} failed) written to {table}"
              + (f" and {figure.name}" if figure else "") + ".")
        return 1 if failed else 0

    if args.workers is not None and args.workers < 1:
        raise InputError(f"--workers must be 1 or more, got {args.workers}.")
    if args.field_strength is not None and not 0 < args.field_strength <= 21:
        raise InputError(f"--field-strength {args.field_strength:g}: give the field strength in tesla (e.g. 3).")
    if args.no_worker_timeout is not None and args.no_worker_timeout <= 0:
        raise InputError(f"--no-worker-timeout must be positive, got {args.no_worker_timeout:g}.")
    cohort.prepare_output(out, bids_dir, None)  # before any work (indexing a large data set takes time)
    if out.exists():
        with cohort.output_lock(out):  # refused at once if another batch writes here
            pass
    return _participants(args, bids_dir, out, start)


def _participants(args, bids_dir: Path, out: Path, start: float) -> int:
    import os

    from .. import bids, cohort, predict
    from . import Terminated, progress_bar

    # predict's rule: --method, else the method the --model file was trained for, else the default
    method = predict.resolve_method(args.method, args.model)[0].name
    model_file, model_sha = cohort.model_identity(method, args.model)
    config = cohort.BatchConfig(str(out), str(bids_dir), method, model_file, model_sha, args.device,
                                args.field_strength)
    layout = bids.open_layout(bids_dir, [Path(d).absolute() for d in args.derivatives])
    units = bids.find_inputs(layout, args.participant_label)
    cohort.prepare_output(out, bids_dir, config)
    rows = []
    with cohort.output_lock(out):
        cohort.remove_partials(out)  # of a killed run (the lock says no other batch is writing)
        workers = args.workers or max(1, min(os.cpu_count() or 1, len(cohort.folders_of(units))))
        client, cluster = cohort.start_client(workers, args.scheduler, args.memory_limit)
        if not args.verbose:  # the driver's distributed log (reconnect attempts, tracebacks) stays out
            for name in [n for n in logging.root.manager.loggerDict if n.split(".")[0] == "distributed"]:
                logging.getLogger(name).setLevel(logging.CRITICAL)
        bar = progress_bar(len(units), "Subjects", unit="subject")

        def on_row(row):
            rows.append(row)
            bar.update(1)
            if row["status"] == cohort.STATUS_FAILED:
                bar.write(f"oefpredictor batch: {row['name']}: failed: {row['reason']}", file=sys.stderr)

        timeout = cohort.NO_WORKER_TIMEOUT_S if args.no_worker_timeout is None else args.no_worker_timeout
        stopped = None
        try:
            cohort.run_units(units, config, client, on_row, no_worker_timeout_s=timeout)
        except cohort.ClusterLost as exc:
            stopped = f"{exc}"
        except cohort.OutputLost as exc:
            raise InputError(str(exc)) from None
        except (KeyboardInterrupt, Terminated) as exc:  # stop the workers, then say truly what is left
            bar.close()
            _close(client, cluster)
            left = cohort.remove_partials(out) if out.exists() else []
            done = sum(r["status"] == cohort.STATUS_OK for r in rows)
            sys.stderr.write(f"oefpredictor batch: stopped after {len(rows)} of {len(units)} subject(s); the {done} "
                             f"finished are kept in {out} (a rerun resumes)" + (
                                 f"; partial folders left: {', '.join(str(p) for p in left)}" if left else
                                 "; no partial output was kept") + ".\n")
            return 130 if isinstance(exc, KeyboardInterrupt) else 128 + signal.SIGTERM
        finally:
            bar.close()
            _close(client, cluster)
        if stopped:
            kept = sum(r.get("status") == cohort.STATUS_OK for r in cohort.write_group(out)[0])
            raise InputError(f"{stopped}; the run stopped, the finished subjects are kept ({kept} with maps in {out}), "
                             "the others were not run. Rerun the same command to do the rest (finished ones are "
                             "skipped).")
        _, table, figure = cohort.write_group(out)
    failed = [r for r in rows if r["status"] == cohort.STATUS_FAILED]
    skipped = [r for r in rows if r.get("skipped")]
    where = f"on {args.scheduler}" if args.scheduler else f"on {workers} local worker(s)"
    sys.stderr.flush()  # the result line comes last
    print(f"{len(rows)} subject(s) {where} in {time.perf_counter() - start:.1f} s: "
          f"{len(rows) - len(failed) - len(skipped)} done, {len(skipped)} unchanged (skipped), {len(failed)} failed"
          + (f" ({', '.join(r['name'] for r in failed)})" if failed else "")
          + f". Maps in {out}/sub-*; cohort table {table.name}" + (f", figure {figure.name}" if figure else "") + ".")
    return 1 if failed else 0


def _drop_abandoned_fetches(record: logging.LogRecord) -> bool:
    """A logging filter: a result fetch still waiting when the client closes ends in Dask's AllExit,
    and asyncio reports each such task ("Task exception was never retrieved") when it is collected.
    They are this run's own abandoned waits, not news for the user."""
    exc_type = record.exc_info[0] if record.exc_info else None
    return not (exc_type is not None and exc_type.__name__ == "AllExit")


def _close(client, cluster) -> None:
    """Close the client and a local cluster without hanging on a dead scheduler."""
    asyncio_log = logging.getLogger("asyncio")
    if _drop_abandoned_fetches not in asyncio_log.filters:
        asyncio_log.addFilter(_drop_abandoned_fetches)
    for thing in (client, cluster):
        if thing is None:
            continue
        try:
            thing.close(timeout=10)
        except BaseException:  # a dead scheduler: nothing more to close
            pass
