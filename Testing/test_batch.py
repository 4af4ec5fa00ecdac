"""`oefpredictor batch` on a real local Dask cluster (2 worker processes) over a tiny simulated BIDS
cohort, `simulate --bids` names checked by the bids-validator package, and the pybids input lookup."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from predict_testutils import tiny_model_path


@pytest.fixture(scope="module")
def model(tiny_dataset):
    return str(tiny_model_path(str(tiny_dataset)))


@pytest.fixture(scope="module")
def raw(tiny_noisy_dataset, tmp_path_factory):
    """The three tiny noisy patients as a BIDS raw data set (+ derivatives/simulate)."""
    from OEFPredictorLib import bids

    out = tmp_path_factory.mktemp("bids") / "raw"
    bids.write_simulated_bids(tiny_noisy_dataset, out)
    return out


@pytest.fixture(scope="module")
def scheduler():
    """A running Dask cluster of 2 worker processes, for the reruns (`--scheduler`): one start-up."""
    from dask.distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        yield cluster.scheduler_address


def run_cli(capsys, *argv):
    from OEFPredictorLib.cli import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_simulated_raw_data_set_passes_the_bids_validator_filename_check(raw):
    from bids_validator import BIDSValidator

    validator = BIDSValidator()
    files = [p for p in raw.rglob("*") if p.is_file() and "derivatives" not in p.parts
             and not p.name.startswith(".")]
    names = ["/" + p.relative_to(raw).as_posix() for p in files]
    assert len([n for n in names if n.endswith("_MEGRE.nii.gz")]) == 3 * 8
    assert not [n for n in names if not validator.is_bids(n)]
    assert not validator.is_bids("/sub-P01/anat/sub-P01_MEGRE_echo-1.nii.gz")  # the check can fail
    description = json.loads((raw / "dataset_description.json").read_text())
    assert description["DatasetType"] == "raw" and description["BIDSVersion"]
    deriv = json.loads((raw / "derivatives" / "simulate" / "dataset_description.json").read_text())
    assert deriv["DatasetType"] == "derivative" and deriv["GeneratedBy"][0]["Name"] == "oefpredictor simulate"


def test_simulate_cli_writes_bids(tmp_path, capsys):
    code, out, err = run_cli(capsys, "simulate", "--bids", "--out", tmp_path / "raw", "--patients", "1",
                             "--voxel-size", "6", "--no-noise")
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "raw").iterdir() if not p.name.startswith(".")) == [
        "README", "dataset_description.json", "derivatives", "participants.tsv", "sub-P01"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".simulate-")]  # scratch removed
    assert (tmp_path / "raw" / "participants.tsv").read_text().splitlines()[1].startswith("sub-P01\t")


def test_pybids_finds_per_echo_files_4d_files_sessions_and_missing_inputs(raw, tmp_path):
    from OEFPredictorLib import bids, io

    data = tmp_path / "raw"
    shutil.copytree(raw, data)
    # sub-P02: one 4D file with a list of echo times instead of per-echo files, in a session.
    anat = data / "sub-P02" / "anat"
    echoes = sorted(anat.glob("*_MEGRE.nii.gz"), key=lambda p: int(p.name.split("echo-")[1].split("_")[0]))
    volumes = [io.read_volume(p) for p in echoes]
    tes = [io.read_json(io.sidecar_path(p))["EchoTime"] for p in echoes]
    ses = data / "sub-P02" / "ses-1" / "anat"
    ses.mkdir(parents=True)
    io.write_volume(np.stack([v for v, _ in volumes], axis=-1), volumes[0][1], ses / "sub-P02_ses-1_MEGRE.nii.gz")
    io.write_json({"EchoTime": tes, "MagneticFieldStrength": 3.0}, ses / "sub-P02_ses-1_MEGRE.json")
    shutil.move(anat / "sub-P02_Chimap.nii.gz", ses / "sub-P02_ses-1_Chimap.nii.gz")
    shutil.rmtree(anat)
    (data / "sub-P03" / "anat" / "sub-P03_Chimap.nii.gz").unlink()  # sub-P03 lacks its QSM

    layout = bids.open_layout(data, [data / "derivatives" / "simulate"])
    units = {u.name: u for u in bids.find_inputs(layout)}
    assert sorted(units) == ["sub-P01", "sub-P02_ses-1", "sub-P03"]
    p01 = units["sub-P01"]
    assert [int(p.split("echo-")[1].split("_")[0]) for p in p01.echoes] == list(range(1, 9))
    assert p01.echo_times_ms == pytest.approx([4.5 + 5 * i for i in range(8)])
    assert p01.qsm.endswith("sub-P01_Chimap.nii.gz") and p01.mask.endswith("sub-P01_desc-brain_mask.nii.gz")
    assert p01.dseg.endswith("sub-P01_dseg.nii.gz") and p01.dseg_tsv.endswith("simulate/dseg.tsv")
    assert not p01.missing
    p02 = units["sub-P02_ses-1"]
    assert p02.session == "1" and len(p02.echoes) == 1 and len(p02.echo_times_ms) == 8 and not p02.missing
    assert units["sub-P03"].missing and "QSM" in units["sub-P03"].missing[0]
    assert [u.name for u in bids.find_inputs(layout, ["sub-P03"])] == ["sub-P03"]
    from OEFPredictorLib.errors import InputError

    with pytest.raises(InputError, match="No subject sub-P09"):
        bids.find_inputs(layout, ["P09"])


def test_batch_cohort_with_a_corrupt_subject_and_resumption(raw, tmp_path, capfd, model, scheduler):
    """The issue's acceptance run: 3 subjects, one corrupt, on a new local cluster of 2 worker
    processes; then one good subject's outputs deleted and the run repeated (on a running cluster).
    The output is read at the file descriptors (capfd), so the worker processes' own lines count too:
    TensorFlow's import-time log lines must not reach the user."""
    from OEFPredictorLib import bids, cli, io, predict
    from OEFPredictorLib.cohort import RECORD_FILE

    data = tmp_path / "raw"
    shutil.copytree(raw, data)
    corrupt = data / "sub-P03" / "anat" / "sub-P03_echo-3_part-mag_MEGRE.nii.gz"
    corrupt.write_bytes(corrupt.read_bytes()[:200])  # a truncated file
    out = tmp_path / "derivatives" / "oefpredictor"
    argv = ["batch", data, out, "--derivatives", data / "derivatives" / "simulate", "--model", model,
            "--method", "lstm", "--workers", "2", "--memory-limit", "3GiB"]

    code, stdout, err = run_cli(capfd, *argv)
    assert code == 1, err
    assert not [line for line in err.splitlines() if "oneDNN" in line or "absl::InitializeLog" in line], err
    failure_lines = [l for l in err.splitlines() if "sub-P03: failed:" in l]
    assert len(failure_lines) == 1 and "sub-P03_echo-3_part-mag_MEGRE.nii.gz" in failure_lines[0], err
    assert "2 done, 0 unchanged (skipped), 1 failed (sub-P03)" in stdout
    assert not (out / "sub-P03").exists()
    for s in ("P01", "P02"):
        names = {p.name for p in (out / f"sub-{s}" / "anat").iterdir()}
        assert {f"sub-{s}_desc-OEF_map.nii.gz", f"sub-{s}_desc-OEF_map.json", f"sub-{s}_desc-brain_mask.nii.gz",
                f"sub-{s}_desc-quality_map.nii.gz", f"sub-{s}_desc-chinb_map.nii.gz"} <= names
    side = json.loads((out / "sub-P01" / "anat" / "sub-P01_desc-OEF_map.json").read_text())
    assert side["Units"] == "%" and side["Sources"][0] == "bids:raw:sub-P01/anat/sub-P01_echo-1_part-mag_MEGRE.nii.gz"
    description = json.loads((out / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative"
    assert description["GeneratedBy"][0]["Model"]["SHA256"] == io.read_json(model.replace(".keras", ".json"))["sha256"]

    # The maps are those of `predict` on the same inputs.
    layout = bids.open_layout(data, [data / "derivatives" / "simulate"])
    unit = bids.find_inputs(layout, ["P01"])[0]
    echoes, geometry, tes, _ = io.read_echo_series(unit.echoes)
    from OEFPredictorLib import physics

    inputs = predict.PredictionInputs(echoes, io.read_volume(unit.qsm)[0], physics.Protocol.from_milliseconds(tes),
                                      io.read_volume(unit.mask)[0] > 0.5)
    expected = predict.predict_maps(inputs, model=model, device="cpu", method="lstm").maps["OEF"]
    written = io.read_volume(out / "sub-P01" / "anat" / "sub-P01_desc-OEF_map.nii.gz")[0]
    np.testing.assert_allclose(written, expected, atol=1e-4)

    # The cohort table: one row per subject with status, reason, voxels, time and per-tissue OEF.
    rows = [l.split("\t") for l in (out / "cohort_OEF.tsv").read_text().splitlines()]
    table = {r[0]: dict(zip(rows[0], r)) for r in rows[1:]}
    assert [table[s]["status"] for s in ("sub-P01", "sub-P02", "sub-P03")] == ["ok", "ok", "failed"]
    assert "MEGRE" in table["sub-P03"]["reason"] and table["sub-P01"]["reason"] == "n/a"
    mask = io.read_volume(out / "sub-P01" / "anat" / "sub-P01_desc-brain_mask.nii.gz")[0] > 0
    assert int(table["sub-P01"]["n_voxels"]) == int(mask.sum())
    assert float(table["sub-P01"]["OEF_mean"]) == pytest.approx(float(written[mask].mean()), abs=1e-2)
    labels = io.read_volume(data / "derivatives" / "simulate" / "sub-P01" / "anat" / "sub-P01_dseg.nii.gz")[0]
    assert float(table["sub-P01"]["OEF_median_WM"]) == pytest.approx(
        float(np.median(written[mask & (labels == 2)])), abs=1e-2)
    assert (out / "cohort_OEF.png").stat().st_size > 5000
    assert json.loads((out / "logs" / "sub-P03_failed.json").read_text())["status"] == "failed"

    # Rerun after deleting sub-P02's outputs: only sub-P02 is recomputed (sub-P01 is untouched).
    p01_record = (out / "sub-P01" / RECORD_FILE).read_text()
    p01_mtime = (out / "sub-P01" / "anat" / "sub-P01_desc-OEF_map.nii.gz").stat().st_mtime_ns
    shutil.rmtree(out / "sub-P02")
    argv = argv[:-4] + ["--scheduler", scheduler]
    code, stdout, err = run_cli(capfd, *argv)
    assert code == 1 and "1 done, 1 unchanged (skipped), 1 failed (sub-P03)" in stdout, stdout + err
    assert (out / "sub-P02" / "anat" / "sub-P02_desc-OEF_map.nii.gz").exists()
    assert (out / "sub-P01" / RECORD_FILE).read_text() == p01_record
    assert (out / "sub-P01" / "anat" / "sub-P01_desc-OEF_map.nii.gz").stat().st_mtime_ns == p01_mtime
    log = (out / "logs" / "batch.log").read_text().splitlines()
    assert [l.split("\t")[1:3] for l in log[-3:] if "sub-P01" in l] == [["sub-P01", "skipped (unchanged)"]]

    # A changed input is recomputed; the fixed subject succeeds and its failure record goes.
    shutil.copyfile(raw / "sub-P03" / "anat" / corrupt.name, corrupt)
    code, stdout, err = run_cli(capfd, *argv, "--participant-label", "P03")
    assert code == 0 and "1 done" in stdout, stdout + err
    assert not (out / "logs" / "sub-P03_failed.json").exists()
    code, stdout, err = run_cli(capfd, "batch", data, out, "group")
    assert code == 0 and "3 subject(s) (0 failed)" in stdout, stdout + err


def test_batch_refuses_bad_folders_before_any_work(raw, tmp_path, capsys, model):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    code, _, err = run_cli(capsys, "batch", raw, foreign, "--model", model, "--method", "lstm")
    assert code == 2 and "did not write" in err and (foreign / "notes.txt").read_text() == "mine"
    (tmp_path / "notbids").mkdir()
    code, _, err = run_cli(capsys, "batch", tmp_path / "notbids", tmp_path / "out", "--model", model)
    assert code == 2 and "not a BIDS data set" in err and not (tmp_path / "out").exists()
    code, _, err = run_cli(capsys, "batch", raw, raw / "out", "--model", model)
    assert code == 2 and "inside the BIDS data set" in err


def test_a_subject_whose_worker_runs_out_of_memory_fails_alone_with_that_reason(raw, tmp_path, capsys, model):
    """A real memory limit below what a prediction needs (TensorFlow alone takes more): the nanny
    kills the worker, and the subject fails at once with a one-line reason instead of being retried."""
    out = tmp_path / "out"
    code, stdout, err = run_cli(capsys, "batch", raw, out, "--derivatives", raw / "derivatives" / "simulate",
                                "--model", model, "--method", "lstm", "--workers", "1", "--memory-limit", "400MiB",
                                "--participant-label", "P01")
    assert code == 1, stdout + err
    line = [l for l in err.splitlines() if "sub-P01: failed:" in l]
    assert len(line) == 1 and "out of memory" in line[0] and "--memory-limit" in line[0], err
    assert not (out / "sub-P01").exists() and "failed" in (out / "cohort_OEF.tsv").read_text()


def test_a_batch_with_the_bundled_context_models_names_them_all_and_skips_only_while_they_are_the_same():
    """Without --model the context method's units each run the bundled model that reads their echo train:
    the data set's description names every file, and the rerun key is a checksum of them all."""
    from OEFPredictorLib import cohort, models, resources

    file, key = cohort.model_identity("context", None)
    paths = resources.bundled_model_paths("context")
    assert file is None and len(paths) == 2 and key not in {models.sha256_of(p) for p in paths}
    config = cohort.BatchConfig("out", "raw", "context", file, key)
    description = cohort.generated_by(config)["Description"]
    assert all(p.name in description for p in paths) and "Model" not in cohort.generated_by(config)
    assert cohort.model_identity("nlls", None) == (None, None)
