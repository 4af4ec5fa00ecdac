"""`oefpredictor batch` on BIDS data as scanners' converters write it (issue 20): a raw data set
without derivatives or masks, run-/acq- echo sets, sessions with a subject-level mask, one subject's
bad metadata, a cluster that loses its workers or scheduler, an output folder deleted during the
run, Ctrl-C, and a second batch into the same output. Real pybids, real Dask (local cluster,
`dask scheduler` and `dask worker` processes), real files; the fast QQ fit (nlls) predicts."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": f"{REPO / 'OEFPredictor'}{os.pathsep}{REPO / 'RNSTFieldTransfer'}"}


@pytest.fixture(scope="module")
def raw(tiny_noisy_dataset, tmp_path_factory):
    """The three tiny noisy patients as a BIDS raw data set, without its derivatives (no masks)."""
    from OEFPredictorLib import bids

    out = tmp_path_factory.mktemp("bids") / "raw"
    bids.write_simulated_bids(tiny_noisy_dataset, out)
    shutil.rmtree(out / "derivatives")
    return out


def _edit_sidecars(folder: Path, change) -> None:
    for path in sorted(folder.glob("*_MEGRE.json")):
        data = json.loads(path.read_text())
        change(data)
        path.write_text(json.dumps(data))


def _rename(folder: Path, old: str, new: str, copy: bool = False) -> None:
    for path in sorted(folder.glob(f"*{old}*")):
        (shutil.copy if copy else shutil.move)(path, path.with_name(path.name.replace(old, new)))


def run_cli(capsys, *argv):
    from OEFPredictorLib.cli import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_inputs_of_raw_runs_sessions_and_bad_metadata(raw, tmp_path):
    from OEFPredictorLib import bids, io

    data = tmp_path / "raw"
    shutil.copytree(raw, data)
    anat1 = data / "sub-P01" / "anat"  # two runs of one acquisition, one QSM each
    _rename(anat1, "sub-P01_", "sub-P01_run-2_", copy=True)
    _rename(anat1, "sub-P01_echo", "sub-P01_run-1_echo")
    _rename(anat1, "sub-P01_Chimap", "sub-P01_run-1_Chimap")
    _edit_sidecars(anat1, lambda d: d.update(EchoTime=d["EchoTime"]) if "EchoTime" in d else None)
    # sub-P02: sessions 1 and 2 (acq-fast in session 2), a subject-level mask, EchoTime in ms in session 2
    anat2 = data / "sub-P02" / "anat"
    for ses, acq in (("1", ""), ("2", "acq-fast_")):
        folder = data / "sub-P02" / f"ses-{ses}" / "anat"
        folder.mkdir(parents=True)
        for path in anat2.glob("sub-P02_*"):
            shutil.copy(path, folder / path.name.replace("sub-P02_", f"sub-P02_ses-{ses}_{acq}"))
    for path in anat2.glob("sub-P02_*"):
        path.unlink()
    mask = (io.read_volume(raw / "sub-P02" / "anat" / "sub-P02_Chimap.nii.gz")[0] != 0)
    io.write_volume(mask.astype(np.uint8), io.read_volume(raw / "sub-P02" / "anat" / "sub-P02_Chimap.nii.gz")[1],
                    anat2 / "sub-P02_desc-brain_mask.nii.gz")
    _edit_sidecars(data / "sub-P02" / "ses-2" / "anat", lambda d: d.update(EchoTime=d["EchoTime"] * 1000))
    # sub-P03: one sidecar that is not JSON
    next((data / "sub-P03" / "anat").glob("*echo-3*.json")).write_text("{not json")

    layout = bids.open_layout(data)  # no derivatives: 'desc' is no entity of a raw layout
    units = {u.name: u for u in bids.find_inputs(layout)}
    assert sorted(units) == ["sub-P01_run-1", "sub-P01_run-2", "sub-P02_ses-1", "sub-P02_ses-2_acq-fast", "sub-P03"]
    r1, r2 = units["sub-P01_run-1"], units["sub-P01_run-2"]
    assert len(r1.echoes) == len(r2.echoes) == 8 and not set(r1.echoes) & set(r2.echoes)
    assert r1.qsm.endswith("sub-P01_run-1_Chimap.nii.gz") and r2.qsm.endswith("sub-P01_run-2_Chimap.nii.gz")
    assert r1.failure is None and r2.failure is None and r1.field_strength == 3.0 and r1.mask is None
    s1 = units["sub-P02_ses-1"]
    assert s1.failure is None and s1.mask.endswith("sub-P02/anat/sub-P02_desc-brain_mask.nii.gz")
    assert "subject-level mask" in s1.notes[0]
    assert "looks like milliseconds" in units["sub-P02_ses-2_acq-fast"].failure
    assert "not valid JSON" in units["sub-P03"].failure
    assert bids.derivative_name("P01", None, "OEF", entities=r2.entities) == "sub-P01_run-2_desc-OEF_map.nii.gz"


def test_batch_on_raw_data_fails_bad_subjects_alone(raw, tmp_path, capsys):
    """Raw data without masks, two runs, one subject without the field strength and one with
    EchoTime in ms: the runs get their own outputs with a derived mask (named in the log and the
    mask's sidecar), each bad subject fails alone with its reason, exit code 1."""
    from OEFPredictorLib import cohort

    data = tmp_path / "raw"
    shutil.copytree(raw, data)
    anat1 = data / "sub-P01" / "anat"
    _rename(anat1, "sub-P01_", "sub-P01_run-2_", copy=True)
    _rename(anat1, "sub-P01_echo", "sub-P01_run-1_echo")
    _edit_sidecars(data / "sub-P02" / "anat", lambda d: d.pop("MagneticFieldStrength"))
    _edit_sidecars(data / "sub-P03" / "anat", lambda d: d.update(EchoTime=d["EchoTime"] * 1000))
    out = tmp_path / "out"
    code, stdout, err = run_cli(capsys, "batch", data, out, "--method", "nlls", "--workers", "1")
    assert code == 1, err
    lines = [l for l in stdout.strip().splitlines() if l.strip()]
    assert lines[-1].startswith("4 subject(s)") and "2 done" in lines[-1] and "2 failed" in lines[-1]
    assert "Traceback" not in err
    log = (out / "logs" / "batch.log").read_text()
    assert "sub-P02\tfailed\tThe field strength of" in log and "--field-strength" in log
    assert "sub-P03\tfailed\tEchoTime" in log and "milliseconds" in log
    for run in ("run-1", "run-2"):
        assert f"sub-P01_{run}\tok\tmask derived: where the QSM is defined" in log
        mask_side = json.loads((out / "sub-P01" / "anat" / f"sub-P01_{run}_desc-brain_mask.json").read_text())
        assert mask_side["MaskDerived"] is True and "QSM is defined" in mask_side["MaskSource"]
        oef_side = json.loads((out / "sub-P01" / "anat" / f"sub-P01_{run}_desc-OEF_map.json").read_text())
        assert oef_side["MagneticFieldStrength"] == 3.0
    table = (out / cohort.TABLE_FILE).read_text().splitlines()
    assert "name" in table[0].split("\t")
    failed = [l for l in table[1:] if "\tfailed\t" in l]
    assert len(failed) == 2 and any("field strength" in l for l in failed)
    # the field strength given on the command line: sub-P02 then runs, at the field given
    code, stdout, err = run_cli(capsys, "batch", data, out, "--method", "nlls", "--workers", "1",
                                "--participant-label", "P02", "--field-strength", "7")
    assert code == 0, err
    side = json.loads((out / "sub-P02" / "anat" / "sub-P02_desc-OEF_map.json").read_text())
    assert side["MagneticFieldStrength"] == 7.0


def test_a_second_batch_into_the_same_output_is_refused(raw, tmp_path, capsys):
    from OEFPredictorLib import cohort, io

    out = tmp_path / "out"
    out.mkdir()
    (out / io.OUTPUT_MARKER).write_text("x")
    with cohort.output_lock(out):  # a batch that is running (this process holds the lock)
        code, _, err = run_cli(capsys, "batch", raw, out, "--method", "nlls")
    assert code == 2 and err.count("\n") == 1 and "Another oefpredictor batch" in err
    assert not list(out.glob("sub-*"))
    # a lock left by a killed run (its process is gone) is taken over
    (out / cohort.LOCK_FILE).write_text(f"999999999 {socket.gethostname()}\n")
    with cohort.output_lock(out):
        pass
    assert not (out / cohort.LOCK_FILE).exists()


# --- The run stopped from outside: a subprocess batch, acted on once its first unit is done ------
def _start_batch(raw, out, *extra):
    # SIGINT as a terminal gives it: a suite started in the background (nohup, `&`) ignores SIGINT, and a child
    # inherits that, so Ctrl-C would never reach the batch (test_reliability does the same)
    return subprocess.Popen([sys.executable, "-m", "OEFPredictorLib.cli", "batch", str(raw), str(out),
                             "--method", "nlls", *map(str, extra)], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, encoding="utf-8", errors="replace",
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_for_first_unit(process, out: Path, timeout=300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if list(out.glob("sub-*/.oefpredictor-batch*.json")):
            return
        assert process.poll() is None, process.communicate()
        time.sleep(0.2)
    process.kill()
    raise AssertionError("no unit finished in time")


def _finish(process, timeout=200):
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        raise AssertionError("the batch did not end in bounded time")
    return process.returncode, stdout, stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def external_cluster():
    """A `dask scheduler` process and one `dask worker --no-nanny` process (nothing restarts it)."""
    bin_dir = Path(sys.executable).parent
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    procs = {"scheduler": subprocess.Popen([bin_dir / "dask", "scheduler", "--port", str(port), "--no-dashboard"],
                                           env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)}
    time.sleep(3)
    procs["worker"] = subprocess.Popen([bin_dir / "dask", "worker", address, "--nthreads", "1", "--no-nanny",
                                        "--no-dashboard"], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    from dask.distributed import Client

    with Client(address, timeout="30s") as client:
        client.wait_for_workers(1, timeout=60)
    yield address, procs
    for p in procs.values():
        if p.poll() is None:
            p.kill()
            p.wait()


def _assert_one_line_and_kept(code, stdout, stderr, out, expected):
    lines = [l for l in stderr.replace("\r", "\n").splitlines() if l.strip() and "%|" not in l]
    assert code != 0
    assert len(lines) == 1 and expected in lines[0], lines
    assert "Traceback" not in stderr
    assert len(list(out.glob("sub-*/.oefpredictor-batch*.json"))) >= 1  # the finished unit is kept


@pytest.mark.parametrize("killed", ["worker", "scheduler"])
def test_a_cluster_that_loses_its_workers_or_scheduler_ends_the_run(raw, tmp_path, external_cluster, killed):
    address, procs = external_cluster
    out = tmp_path / "out"
    batch = _start_batch(raw, out, "--scheduler", address, "--no-worker-timeout", "10")
    _wait_for_first_unit(batch, out)
    procs[killed].send_signal(signal.SIGKILL)
    code, stdout, stderr = _finish(batch)
    expected = "no worker for 10 s" if killed == "worker" else "connection to the Dask scheduler was lost"
    _assert_one_line_and_kept(code, stdout, stderr, out, expected)
    assert "not run" in stderr and "Rerun" in stderr and "(1 with maps" in stderr


def test_an_output_folder_deleted_during_the_run_is_one_line(raw, tmp_path):
    out = tmp_path / "out"
    batch = _start_batch(raw, out, "--workers", "1")
    _wait_for_first_unit(batch, out)
    shutil.rmtree(out)
    code, _, stderr = _finish(batch)
    lines = [l for l in stderr.replace("\r", "\n").splitlines() if l.strip() and "%|" not in l]
    assert code == 2 and len(lines) == 1 and "was deleted or moved during the run" in lines[0], lines
    assert not out.exists()  # not made again by a worker


def test_ctrl_c_says_what_was_kept(raw, tmp_path):
    out = tmp_path / "out"
    batch = _start_batch(raw, out, "--workers", "1")
    _wait_for_first_unit(batch, out)
    batch.send_signal(signal.SIGINT)
    code, _, stderr = _finish(batch)
    assert code == 130
    message = [l for l in stderr.replace("\r", "\n").splitlines() if "stopped after" in l]
    assert len(message) == 1 and "finished are kept" in message[0]
    partials = [p for p in out.rglob("*.partial-*")]
    assert ("no partial output was kept" in message[0]) == (not partials), (message, partials)
    assert not partials


def test_abandoned_result_fetches_are_not_reported_after_the_cluster_is_lost():
    """A result fetch still waiting when the client closes ends in Dask's AllExit; asyncio would
    print "Task exception was never retrieved" and its traceback after the one-line reason (seen
    in CI when a worker was killed mid-fetch). The batch's closing filter drops exactly those."""
    import asyncio
    import gc
    import logging

    from distributed.client import AllExit

    from OEFPredictorLib.cli import batch

    seen = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record)

    handler = Keep()
    asyncio_log = logging.getLogger("asyncio")
    asyncio_log.addHandler(handler)
    try:
        batch._close(None, None)

        async def abandoned(exc):
            raise exc

        async def main():
            for exc in (AllExit(), ValueError("a real bug")):
                asyncio.get_running_loop().create_task(abandoned(exc))
            await asyncio.sleep(0)

        asyncio.run(main())
        gc.collect()
    finally:
        asyncio_log.removeHandler(handler)
        asyncio_log.removeFilter(batch._drop_abandoned_fetches)
    reported = [r.exc_info[0].__name__ for r in seen if r.exc_info]
    assert reported == ["ValueError"], reported


def test_batch_corrects_with_a_derivative_field_map_and_needs_its_unit(raw, tmp_path, capsys):
    """A QSM pipeline's field map in a derivatives folder (Units in its sidecar) corrects that
    subject's echoes, and the log says which file; one without Units fails its subject alone,
    saying so; a raw fmap/ acquisition (its own grid) is not taken; a subject without any is
    logged as not corrected."""
    from OEFPredictorLib import bids, io

    data = tmp_path / "raw"
    shutil.copytree(raw, data)
    derivatives = tmp_path / "qsmpipe"
    derivatives.mkdir()
    io.write_json({"Name": "a QSM pipeline", "BIDSVersion": bids.BIDS_VERSION, "DatasetType": "derivative",
                   "GeneratedBy": [{"Name": "qsmpipe"}]}, derivatives / "dataset_description.json")
    for subject, sidecar in (("P01", {"Units": "Hz"}), ("P02", {})):
        qsm, geometry = io.read_volume(data / f"sub-{subject}" / "anat" / f"sub-{subject}_Chimap.nii.gz")
        field = (2.0 * np.indices(qsm.shape)[0]).astype(np.float32) * (qsm != 0)
        anat = derivatives / f"sub-{subject}" / "anat"
        anat.mkdir(parents=True)
        io.write_volume(field, geometry, anat / f"sub-{subject}_desc-total_fieldmap.nii.gz")
        io.write_json(sidecar, anat / f"sub-{subject}_desc-total_fieldmap.json")
    fmap = data / "sub-P03" / "fmap"  # a field-mapping acquisition on its own grid: not the correction's input
    fmap.mkdir()
    io.write_volume(np.zeros((5, 6, 7), np.float32), io.Geometry((3.0, 3.0, 3.0), (0.0, 0.0, 0.0),
                                                                 (1, 0, 0, 0, 1, 0, 0, 0, 1)), fmap / "sub-P03_fieldmap.nii.gz")
    io.write_json({"Units": "Hz"}, fmap / "sub-P03_fieldmap.json")

    units = {u.name: u for u in bids.find_inputs(bids.open_layout(data, [derivatives]))}
    assert units["sub-P01"].field_map.endswith("sub-P01_desc-total_fieldmap.nii.gz")
    assert units["sub-P03"].field_map is None
    assert any(p.endswith("sub-P01_desc-total_fieldmap.json") for p in units["sub-P01"].files())  # resumption key

    out = tmp_path / "out"
    code, stdout, err = run_cli(capsys, "batch", data, out, "--derivatives", derivatives, "--method", "nlls",
                                "--workers", "1")
    assert code == 1, err
    log = (out / "logs" / "batch.log").read_text()
    line = {name: next(l for l in log.splitlines() if f"\t{name}\t" in l) for name in ("sub-P01", "sub-P02", "sub-P03")}
    assert "\tok\t" in line["sub-P01"] and "field map sub-P01_desc-total_fieldmap.nii.gz" in line["sub-P01"]
    assert "\tfailed\tThe unit of the field map sub-P02_desc-total_fieldmap.nii.gz is unknown" in line["sub-P02"]
    assert "\tok\t" in line["sub-P03"] and "no field map: field gradients not corrected" in line["sub-P03"]
