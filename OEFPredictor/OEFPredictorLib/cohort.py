"""Cohort runs: every subject (and session) of a BIDS data set is one task on a dask.distributed
cluster; the outputs form a BIDS derivatives data set with a group cohort table.

OUTPUT_DIR layout:

    dataset_description.json       DatasetType derivative, GeneratedBy (version, method, model SHA-256)
    sub-<s>/[ses-<x>/]anat/        sub-<s>[_ses-<x>]_desc-<Map>_map.nii.gz + .json per map of `predict`,
                                   sub-<s>[_ses-<x>]_desc-brain_mask.nii.gz (the voxels predicted)
    sub-<s>/[ses-<x>/].oefpredictor-batch[_<entities>].json   a unit's record: checksums, statistics,
                                   outputs (units of one folder: acq-/run- echo sets; see bids)
    .oefpredictor-batch.lock       held while a batch writes here: a second one is refused
    logs/batch.log                 one line per finished or failed unit, per run
    logs/sub-<s>[_ses-<x>]_failed.json  the reason of a failed unit (removed once it succeeds)
    cohort_OEF.tsv + .json         one row per unit: status, reason, voxels, time, OEF statistics
    cohort_OEF.png                 OEF per subject (box plot)

Isolation: a unit's failure (bad file or metadata, wrong protocol, a worker killed for memory) is
caught and recorded; the others go on. The units of one folder (the echo sets of a subject and
session) run one after the other in one task, so that no two workers write one folder. A cluster
that loses all its workers, or its scheduler, ends the run (ClusterLost) in bounded time; the
finished units are kept. Atomicity: a unit's folder is built under a temporary name and moved
into place complete (io.atomic_directory), with its record inside, so a killed run loses nothing
that was finished. Resumption: a unit whose record matches the SHA-256 of every input file, the
model's SHA-256, the method and the version, and whose outputs all exist, is skipped.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import logging
import math
import os
import shutil
import socket
import time
from pathlib import Path

import numpy as np

from . import __version__, bids, files, io, maptable, methods, native_log
from .errors import InputError

log = logging.getLogger(__name__)

RECORD_FILE = ".oefpredictor-batch.json"
LOCK_FILE = ".oefpredictor-batch.lock"
NO_WORKER_TIMEOUT_S = 120.0  # a cluster without any worker this long ends the run
POLL_S = 1.0
LOG_DIR = "logs"
TABLE_FILE = "cohort_OEF.tsv"
FIGURE_FILE = "cohort_OEF.png"
BOX_PERCENTILES = (5, 25, 50, 75, 95)  # of OEF in the mask: the figure's boxes and whiskers
STATUS_OK, STATUS_FAILED = "ok", "failed"
WIDTH_MAP = "OEF_width"  # the interval-width map, when the method gives one (percentage points)


@dataclasses.dataclass
class BatchConfig:
    """What every task needs; plain values, sent to the workers."""

    out: str
    raw_root: str
    method: str
    model_file: str | None  # None: the method's bundled models (each unit runs the one reading its protocol), or none
    model_sha256: str | None  # of the given model file, or of the bundled ones together
    device: str = "cpu"
    field_strength: float | None = None  # --field-strength: overrides the sidecars (never assumed)

    def key(self, checksums: dict) -> dict:
        """What a finished unit must match to be skipped on a rerun."""
        return {"inputs": checksums, "method": self.method, "model_sha256": self.model_sha256,
                "field_strength": self.field_strength, "version": __version__}


def model_identity(method: str, model: str | None) -> tuple[str | None, str | None]:
    """(model file, SHA-256) of a method: the given file and its SHA-256; for the method's bundled models
    (None, the SHA-256 of their SHA-256s: a rerun skips units only while the same models are bundled);
    (None, None) for methods without a model file."""
    import hashlib

    from . import models, resources

    if model:
        path = Path(model).absolute()
        if not path.is_file():
            raise InputError(f"--model {model}: no such model file.")
        return str(path), models.sha256_of(path)
    if not methods.get(method).uses_model:
        return None, None
    try:
        paths = resources.bundled_model_paths(method)
    except FileNotFoundError as exc:
        raise InputError(f"The bundled {method} model is not installed ({exc})") from None
    return None, hashlib.sha256(" ".join(models.sha256_of(p) for p in paths).encode()).hexdigest()




def generated_by(config: BatchConfig) -> dict:
    model = Path(config.model_file).name if config.model_file else None
    bundled = ", ".join(methods.get(config.method).model_files) if not model and config.model_sha256 else None
    described = f"method {config.method}" + (f", model {model} (SHA-256 {config.model_sha256})" if model else "")
    if bundled:
        described += f", bundled models {bundled} (each subject's maps name the one that read its echo protocol)"
    entry = {"Name": "oefpredictor", "Version": __version__,
             "Description": f"OEF maps from mGRE magnitudes + QSM; {described}",
             "Method": config.method}
    if model:
        entry["Model"] = {"File": model, "SHA256": config.model_sha256}
    return entry


# --- The output folder -------------------------------------------------------------------------
def prepare_output(out: str | Path, bids_dir: str | Path, config: BatchConfig | None) -> Path:
    """Check OUTPUT_DIR (new, empty, or an earlier batch output; not inside the raw data set except
    under derivatives/), clear half-written units of a killed run, and write the description."""
    out, bids_dir = Path(out).absolute(), Path(bids_dir).absolute()
    if out.resolve() == bids_dir.resolve() or (out.resolve().is_relative_to(bids_dir.resolve())
                                              and not out.resolve().is_relative_to(bids_dir.resolve() / "derivatives")):
        raise InputError(f"{out} lies inside the BIDS data set; write to {bids_dir / 'derivatives' / 'oefpredictor'} "
                         "or a folder outside it.")
    if out.exists():
        if not out.is_dir():
            raise InputError(f"{out} exists and is not a folder; choose another output folder.")
        if any(out.iterdir()) and not (out / io.OUTPUT_MARKER).exists():
            raise InputError(f"{out} holds files that oefpredictor did not write; choose a new or empty "
                             "output folder (a rerun into an earlier batch output resumes it).")
    io.check_writable_dir(out)
    if config is None:
        return out
    out.mkdir(parents=True, exist_ok=True)
    (out / io.OUTPUT_MARKER).write_text("Written by oefpredictor batch; reruns resume it.\n")
    io.write_json(bids.derivative_description("OEFPredictor OEF maps", generated_by(config), bids_dir),
                  out / "dataset_description.json")
    (out / LOG_DIR).mkdir(exist_ok=True)
    return out


@contextlib.contextmanager
def output_lock(out: Path):
    """Held while a batch writes OUTPUT_DIR: a second batch into it is refused (one line) instead
    of both writing the same units. A lock left by a killed run (its process gone) is taken over."""
    lock = out / LOCK_FILE
    me = f"{os.getpid()} {socket.gethostname()}"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                pid, host = lock.read_text(encoding="utf-8").split()[:2]
            except (OSError, ValueError):
                pid, host = "?", ""
            if host == socket.gethostname() and pid.isdigit() and not io._process_alive(int(pid)):
                lock.unlink(missing_ok=True)  # its run was killed
                continue
            raise InputError(f"Another oefpredictor batch (process {pid} on {host or 'another machine'}) is writing "
                             f"{out}; wait for it to finish or choose another output folder (if no batch runs, "
                             f"remove {lock.name}).") from None
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(me + "\n")
        break
    try:
        yield lock
    finally:
        try:
            if lock.read_text(encoding="utf-8").strip() == me:
                lock.unlink()
        except OSError:
            pass


def remove_partials(out: Path) -> list[Path]:
    """Half-built unit folders (a killed or interrupted worker's) under OUTPUT_DIR: removed. Returns
    those that could not be removed."""
    left = []
    for stale in [*out.glob(".sub-*.partial-*"), *out.glob("sub-*/.*.partial-*"), *out.glob("sub-*/ses-*/.*.partial-*")]:
        if (stale / io.OUTPUT_MARKER).exists():
            shutil.rmtree(stale, ignore_errors=True)
            if stale.exists():
                left.append(stale)
    return left


def _failure_path(out: Path, name: str) -> Path:
    return out / LOG_DIR / f"{name}_failed.json"


def _record_path(out: Path, unit: bids.UnitInputs) -> Path:
    name = RECORD_FILE if not unit.entities else RECORD_FILE.replace(".json", f"_{unit.entities}.json")
    return out / bids.unit_dir(unit.subject, unit.session) / name


class OutputLost(RuntimeError):
    """The output folder was deleted or moved during the run."""


def check_output_present(out: Path) -> None:
    if not (out / io.OUTPUT_MARKER).is_file():
        raise OutputLost(f"{out} was deleted or moved during the run; nothing more was written. Rerun into a "
                         "folder that stays in place.")


def input_checksums(unit: bids.UnitInputs) -> dict:
    from .models import sha256_of

    return {Path(p).name: sha256_of(p) for p in unit.files()}


def completed_record(out: Path, unit: bids.UnitInputs, key: dict) -> dict | None:
    """The unit's record if its outputs are complete and were made from these inputs and model."""
    path = _record_path(out, unit)
    try:
        record = io.read_json(path)
    except (OSError, ValueError):
        return None
    folder = path.parent
    if record.get("key") != key or not all((folder / f).exists() for f in record.get("outputs", [])):
        return None
    return record


# --- One unit (runs on a worker) ------------------------------------------------------------------
def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if isinstance(exc, InputError) else f"{type(exc).__name__}: {text}"[:300]


def unit_row(unit: bids.UnitInputs) -> dict:
    return {"participant_id": f"sub-{unit.subject}", "session_id": f"ses-{unit.session}" if unit.session else "",
            "name": unit.name}


def process_folder(units: list[bids.UnitInputs], config: BatchConfig) -> list[dict]:
    """The units of one output folder (a subject and session), one after the other: their rows."""
    if native_log.quiet_requested():  # in a worker process: its TensorFlow import writes nothing either
        native_log.import_without_native_stderr("tensorflow")
    return [process_unit(unit, config) for unit in units]


def process_unit(unit: bids.UnitInputs, config: BatchConfig) -> dict:
    """Predict one unit and write its files atomically. Returns its row; a failure is returned as
    a row with its one-line reason, never raised (except a lost output folder: OutputLost)."""
    start = time.perf_counter()
    row = unit_row(unit)
    try:
        if unit.failure:
            raise InputError(unit.failure)
        key = config.key(input_checksums(unit))
        out = Path(config.out)
        done = completed_record(out, unit, key)
        if done is not None:
            return {**row, **done, "skipped": True}
        record = _predict_and_write(unit, config, key, out, start)
        return {**row, **record, "skipped": False}
    except OutputLost:
        raise
    except Exception as exc:  # isolation: every unit's own failure becomes its row
        return {**row, "status": STATUS_FAILED, "reason": one_line(exc), "skipped": False,
                "time_s": round(time.perf_counter() - start, 2)}


def _predict_and_write(unit: bids.UnitInputs, config: BatchConfig, key: dict, out: Path, start: float) -> dict:
    from . import predict

    notes = []
    field = config.field_strength if config.field_strength is not None else unit.field_strength
    inputs, geometry = files.load_inputs(unit.echoes, unit.qsm, unit.mask, echo_times_ms=unit.echo_times_ms,
                                         field_strength=field, notes=notes, field_map=unit.field_map)
    labels, names = None, {}
    if unit.dseg:
        labels, geom = io.read_image(unit.dseg)
        io.check_same_grid(f"the echoes ({Path(unit.echoes[0]).name})", inputs.qsm.shape, geometry,
                           f"the segmentation ({Path(unit.dseg).name})", labels.shape, geom)
        names = bids.read_label_table(unit.dseg_tsv)
    result = predict.predict_maps(inputs, model=config.model_file, device=config.device, method=config.method)
    result.warnings[:0] = notes
    stats = unit_statistics(result, labels, names)
    # what was chosen for the unit, for the log: a derived or a subject-level mask
    chosen = list(unit.notes) + ([f"mask {result.mask_source}"] if result.mask_derived else []) + (
        [f"field map {Path(unit.field_map).name}"] if unit.field_map else ["no field map: field gradients not corrected"])
    sources = [bids.source_uri(p, config.raw_root)
               for p in unit.echoes + [unit.qsm] + [p for p in (unit.mask, unit.field_map) if p]]
    check_output_present(out)  # else atomic_directory would create it again
    with io.atomic_directory(out / bids.unit_dir(unit.subject, unit.session), overwrite=True,
                             command=f"batch {unit.name}") as tmp:
        outputs = write_unit_maps(result, geometry, Path(tmp), unit, config, inputs.protocol, sources)
        record = {"name": unit.name, "status": STATUS_OK, "reason": "", "notes": chosen,
                  "field_strength_T": inputs.protocol.field_strength, "n_voxels": int(result.n_voxels),
                  "predict_s": round(result.elapsed_s, 2), "device": result.device, "method": result.method,
                  "warnings": result.warnings, "stats": stats, "key": key, "outputs": outputs,
                  "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        record["time_s"] = round(time.perf_counter() - start, 2)
        io.write_json(record, Path(tmp) / _record_path(out, unit).name)
    return record


def write_unit_maps(result, geometry, folder: Path, unit: bids.UnitInputs, config: BatchConfig, protocol,
                    sources: list[str]) -> list[str]:
    """predict's maps (files.write_maps, so its conventions hold) under BIDS derivative names in anat/,
    each with a JSON sidecar. Returns the file names relative to `folder`."""
    anat = folder / "anat"
    written = files.write_maps(  # the maps `predict` writes, and the mask
        result, geometry, anat,
        lambda m: m.file and bids.derivative_name(unit.subject, unit.session, m.desc, entities=unit.entities),
        mask_file=bids.derivative_name(unit.subject, unit.session, "brain", "mask", entities=unit.entities))
    card = result.model_card  # the model that ran (a bundled one is chosen by the unit's protocol)
    model = {"File": card.get("file"), "SHA256": card.get("sha256")} if card else None
    common = {"Sources": sources, "Method": result.method, "Model": model, **protocol.to_dict(),
              "MaskDerived": bool(result.mask_derived)}
    outputs = []
    for name, path in written.items():
        if name == "mask":
            sidecar = {"Type": "Brain", "Description": "The voxels predicted (the given or derived brain mask "
                       "without voxels of unusable data)", "Sources": sources,
                       "MaskDerived": bool(result.mask_derived), "MaskSource": result.mask_source}
        else:
            sidecar = {"Description": f"{maptable.MAPS[name].description} (oefpredictor)", "Units": maptable.unit(name),
                       **common}
        io.write_json(sidecar, io.sidecar_path(path))
        outputs += [f"anat/{path.name}", f"anat/{io.sidecar_path(path).name}"]
    return outputs


def unit_statistics(result, labels: np.ndarray | None, names: dict[int, str]) -> dict:
    """OEF mean and median in the mask and per tissue label, the box-plot percentiles, and the
    mean interval width when the method gives one."""
    mask = result.mask
    oef = result.maps["OEF"]
    stats = _summary(oef[mask], "")
    values = oef[mask]
    values = values[np.isfinite(values)]
    stats["box"] = [float(v) for v in np.percentile(values, BOX_PERCENTILES)] if values.size else []
    if labels is not None:
        lab = np.rint(np.nan_to_num(labels)).astype(np.int64)
        for index in sorted(set(np.unique(lab[mask]).tolist()) - {0}):
            name = names.get(index, f"label{index}")
            stats.update(_summary(oef[mask & (lab == index)], f"_{name}"))
    if WIDTH_MAP in result.maps:
        width = result.maps[WIDTH_MAP][mask]
        width = width[np.isfinite(width)]
        stats["OEF_width_mean"] = round(float(width.mean()), 3) if width.size else None
    return stats


def _summary(values: np.ndarray, suffix: str) -> dict:
    values = values[np.isfinite(values)]
    if not values.size:
        return {f"OEF_mean{suffix}": None, f"OEF_median{suffix}": None}
    return {f"OEF_mean{suffix}": round(float(values.mean()), 3),
            f"OEF_median{suffix}": round(float(np.median(values)), 3)}


# --- The run (the driver) ------------------------------------------------------------------------
def start_client(workers: int, scheduler: str | None, memory_limit: str):
    """A dask.distributed Client: on the scheduler given, or on a new local cluster of `workers`
    processes with one thread each. Returns (client, cluster or None)."""
    import dask
    from dask.distributed import Client, LocalCluster

    # A task that kills its worker (out of memory) fails at once, not after three more deaths.
    dask.config.set({"distributed.scheduler.allowed-failures": 0,
                     "distributed.worker.memory.spill": False, "distributed.worker.memory.target": False})
    if scheduler:
        try:
            return Client(scheduler, timeout="20s"), None
        except (OSError, TimeoutError) as exc:
            raise InputError(f"--scheduler {scheduler}: cannot connect ({one_line(exc)}). Start `dask scheduler` "
                             "there, or leave --scheduler out for a local cluster.") from None
    # The network's threads share the cores among the worker processes.
    threads = str(max(1, (os.cpu_count() or 1) // workers))
    env = {"TF_NUM_INTRAOP_THREADS": threads, "TF_NUM_INTEROP_THREADS": "1", "OMP_NUM_THREADS": threads,
           "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2")}
    cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, memory_limit=memory_limit,
                           dashboard_address=None, silence_logs=logging.ERROR, env=env)
    return Client(cluster), cluster


class ClusterLost(RuntimeError):
    """The Dask cluster lost all its workers, or its scheduler: the run cannot go on."""


def folders_of(units: list[bids.UnitInputs]) -> list[list[bids.UnitInputs]]:
    """The units grouped by output folder (subject and session), in order."""
    groups: dict[tuple, list] = {}
    for unit in units:
        groups.setdefault((unit.subject, unit.session), []).append(unit)
    return list(groups.values())


def run_units(units: list[bids.UnitInputs], config: BatchConfig, client, on_row=None,
              no_worker_timeout_s: float = NO_WORKER_TIMEOUT_S) -> list[dict]:
    """Submit one task per output folder and collect the rows as they finish (`on_row(row)`
    after each). Raises ClusterLost when the cluster has had no worker for no_worker_timeout_s or
    lost its scheduler, and OutputLost when the output folder disappears; the rows of the units
    finished by then are recorded."""
    from dask.distributed import as_completed

    futures = {client.submit(process_folder, group, config, pure=False,
                             key=f"oefpredictor-{group[0].name}-{time.time_ns()}"): group
               for group in folders_of(units)}
    rows, out = [], Path(config.out)
    done = as_completed(futures)
    no_workers_since = None

    def check_cluster():
        nonlocal no_workers_since
        check_output_present(out)
        if _worker_count(client):
            no_workers_since = None
            return
        no_workers_since = no_workers_since or time.monotonic()
        if time.monotonic() - no_workers_since > no_worker_timeout_s:
            raise ClusterLost(f"the Dask cluster has had no worker for {no_worker_timeout_s:g} s (workers killed "
                              "or stopped)")

    while not done.is_empty():
        if not done.has_ready():
            check_cluster()
            time.sleep(POLL_S)
            continue
        for future in done.next_batch(block=False):
            group = futures[future]
            group_rows = _rows_of(future, group, check_cluster)
            for row in group_rows:
                check_output_present(out)
                try:
                    record_outcome(out, row)
                except OSError:
                    check_output_present(out)  # deleted meanwhile: say so, not a traceback
                    raise
                rows.append(row)
                if on_row:
                    on_row(row)
    return rows


def _worker_count(client) -> int:
    try:
        return len(client.scheduler_info().get("workers", {}))
    except Exception:  # no answer from the scheduler: count as no worker (the timeout decides)
        return 0


def _rows_of(future, group: list[bids.UnitInputs], check_cluster) -> list[dict]:
    """The rows of a finished task; a task that could not run fails each of its units. The rows
    live on the worker until fetched: a worker lost meanwhile would leave the fetch waiting for
    a recomputation, so the cluster is checked while waiting."""
    try:
        while True:
            try:
                return future.result(timeout=POLL_S * 5)
            except TimeoutError:
                check_cluster()
    except Exception as exc:
        name = type(exc).__name__
        if isinstance(exc, (ClusterLost, OutputLost)):
            raise
        if "scheduler-connection-lost" in str(exc) or name in ("CommClosedError",):
            raise ClusterLost("the connection to the Dask scheduler was lost (it stopped or crashed)") from None
        if name == "OutputLost":
            raise OutputLost(str(exc)) from None
        if name == "KilledWorker":
            reason = f"the worker running it died (out of memory? raise --memory-limit): {one_line(exc)}"
        else:  # e.g. a remote worker without this package
            reason = f"the task could not run on the cluster: {one_line(exc)}"
        return [{**unit_row(unit), "status": STATUS_FAILED, "skipped": False, "reason": reason} for unit in group]


def record_outcome(out: Path, row: dict) -> None:
    """Log the unit's outcome; keep a failure's reason in logs/ (removed once it succeeds)."""
    failure = _failure_path(out, row["name"])
    if row["status"] == STATUS_FAILED:
        io.write_json({k: row.get(k) for k in ("participant_id", "session_id", "name", "status", "reason",
                                                "time_s")}, failure)
    elif failure.exists():
        failure.unlink()
    what = "skipped (unchanged)" if row.get("skipped") else row["status"]
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    said = row.get("reason") or "; ".join(row.get("notes") or [])  # a failure's reason, else what was chosen
    with open(out / LOG_DIR / "batch.log", "a", encoding="utf-8") as f:
        f.write(f"{stamp}\t{row['name']}\t{what}\t{said}\n")


# --- The group level: cohort table and figure ------------------------------------------------------
def collect_rows(out: str | Path) -> list[dict]:
    """One row per unit from the records and failure files of OUTPUT_DIR (a failure newer than a
    unit's maps wins: its maps are from earlier inputs)."""
    out = Path(out)
    rows = {}
    pattern = RECORD_FILE.replace(".json", "*.json")
    for path in sorted(out.glob(f"sub-*/{pattern}")) + sorted(out.glob(f"sub-*/ses-*/{pattern}")):
        record = io.read_json(path)
        rel = path.parent.relative_to(out).parts
        subject, session = rel[0], (rel[1] if len(rel) > 1 else "")
        name = record.get("name") or subject + (f"_{session}" if session else "")
        rows[name] = {"participant_id": subject, "session_id": session, **record}
    for path in sorted((out / LOG_DIR).glob("*_failed.json")):
        failure = io.read_json(path)
        rows[failure["name"]] = failure
    return [rows[k] for k in sorted(rows)]


def table_columns(rows: list[dict]) -> list[str]:
    base = ["participant_id"] + (["session_id"] if any(r.get("session_id") for r in rows) else [])
    if any(r.get("name") and r["name"] != r["participant_id"] + (f"_{r['session_id']}" if r.get("session_id") else "")
           for r in rows):  # echo sets told apart by acq-/run- entities
        base.append("name")
    base += ["status", "reason", "n_voxels", "time_s", "method", "OEF_mean", "OEF_median"]
    extra = []
    for r in rows:
        for k in (r.get("stats") or {}):
            if k not in base and k not in extra and k != "box":
                extra.append(k)
    width = [k for k in extra if k.startswith(WIDTH_MAP)]
    return base + [k for k in extra if k not in width] + width


def write_group(out: str | Path) -> tuple[list[dict], Path, Path | None]:
    """Rebuild cohort_OEF.tsv (+ its column dictionary) and cohort_OEF.png from OUTPUT_DIR."""
    out = Path(out)
    rows = collect_rows(out)
    columns = table_columns(rows)
    lines = ["\t".join(columns)]
    for r in rows:
        flat = {**r, **(r.get("stats") or {})}
        lines.append("\t".join(_cell(flat.get(c)) for c in columns))
    _atomic_text(out / TABLE_FILE, "\n".join(lines) + "\n")
    io.write_json(_column_dictionary(columns), out / TABLE_FILE.replace(".tsv", ".json"))
    figure = cohort_figure(rows, out / FIGURE_FILE) if rows else None
    return rows, out / TABLE_FILE, figure


def _cell(value) -> str:
    if value is None or value == "" or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return " ".join(str(value).split())  # one line, no tabs


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _column_dictionary(columns: list[str]) -> dict:
    known = {"participant_id": "Subject", "session_id": "Session",
             "name": "The unit: subject, session and the acq-/run- entities of its echo set",
             "status": "ok: maps written; failed: see reason", "reason": "Why the unit failed (one line)",
             "n_voxels": "Voxels predicted (in the mask)", "time_s": "Wall time of the unit on its worker (s)",
             "method": "Prediction method"}
    out = {}
    for c in columns:
        if c in known:
            out[c] = {"Description": known[c]}
        elif c.startswith(WIDTH_MAP):
            out[c] = {"Description": "Mean width of the OEF interval in the mask", "Units": maptable.unit(WIDTH_MAP)}
        elif c.startswith("OEF_"):
            stat, _, tissue = c[len("OEF_"):].partition("_")
            out[c] = {"Description": f"{stat.capitalize()} OEF in " + (f"tissue label {tissue}" if tissue else
                                                                      "the brain mask"), "Units": maptable.unit("OEF")}
    return out


def cohort_figure(rows: list[dict], path: Path) -> Path:
    """OEF per subject: boxes from the 5/25/50/75/95th percentiles in the mask; failed units
    marked in red on the axis."""
    from .figures import _matplotlib

    plt = _matplotlib()
    fig, ax = plt.subplots(figsize=(max(4.0, 0.5 * len(rows) + 2), 4), constrained_layout=True)
    boxes, positions = [], []
    for i, r in enumerate(rows):
        box = (r.get("stats") or {}).get("box") if r.get("status") == STATUS_OK else None
        if box:
            p5, q1, med, q3, p95 = box
            boxes.append({"whislo": p5, "q1": q1, "med": med, "q3": q3, "whishi": p95, "fliers": [],
                          "mean": r["stats"].get("OEF_mean")})
            positions.append(i)
    if boxes:
        ax.bxp(boxes, positions=positions, showmeans=True, widths=0.6)
    ax.set_xticks(range(len(rows)))
    names = [(r.get("name") or r["participant_id"]) + ("" if r.get("status") == STATUS_OK else " (failed)")
             for r in rows]
    for label, r in zip(ax.set_xticklabels(names, rotation=60, ha="right", fontsize=8), rows):
        if r.get("status") != STATUS_OK:
            label.set_color("red")
    ax.set_xlim(-0.7, len(rows) - 0.3)
    ax.set_ylim(*maptable.OEF_RANGE)
    ax.set_ylabel(maptable.MAPS["OEF"].label)
    failed = sum(r.get("status") != STATUS_OK for r in rows)
    ax.set_title(f"OEF per subject in the brain mask (box 25-75 %, whiskers 5-95 %, line median, "
                 f"triangle mean); {failed} failed", fontsize=9)
    tmp = path.with_name(f".{path.stem}.partial{path.suffix}")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, path)
    return path
