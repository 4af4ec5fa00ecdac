"""Issue 12: nothing lost, nothing silently wrong, no tracebacks.

Each test feeds the real command line (or the library) a bad input of the issue's list and checks
what the tool does; docs/bad_inputs.md lists the same cases (rebuilt by tools/bad_inputs_table.py).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from predict_testutils import tiny_model_path

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def model(tiny_dataset):
    return str(tiny_model_path(str(tiny_dataset)))


def run_cli(capsys, *argv):
    from OEFPredictorLib.cli import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code, err, command="predict"):
    lines = [l for l in err.splitlines() if l.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith(f"oefpredictor {command}: error:"), err
    return lines[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def patient(tiny_dataset, tmp_path):
    """A copy of a simulated patient folder (as `simulate` wrote it, marker included)."""
    folder = tmp_path / "sim" / "P01"
    shutil.copytree(tiny_dataset / "P01", folder)
    return folder


# --- Data loss ----------------------------------------------------------------------------------
def test_predict_into_the_patient_folder_keeps_the_patient(capsys, patient, model):
    before = snapshot(patient)
    code, out, err = run_cli(capsys, "predict", "--echoes", patient / "P01_MEGRE.nii.gz", "--qsm",
                             patient / "P01_Chimap.nii.gz", "--model", model, "--device", "cpu",
                             "--out", patient, "--overwrite")
    assert code == 0, err
    after = snapshot(patient)
    for name, content in before.items():  # every simulated file is still there, unchanged
        if name != ".oefpredictor-output":
            assert after[name] == content, name
    assert "oef.nii.gz" in after and "prediction.json" in after
    # and a rerun replaces its own maps, still keeping the patient
    code, out, err = run_cli(capsys, "predict", "--echoes", patient / "P01_MEGRE.nii.gz", "--qsm",
                             patient / "P01_Chimap.nii.gz", "--model", model, "--device", "cpu",
                             "--out", patient, "--overwrite")
    assert code == 0, err
    assert all(snapshot(patient)[n] == c for n, c in before.items() if n != ".oefpredictor-output")
    assert not [p for p in patient.rglob("*") if ".partial" in p.name]


def test_predict_into_a_demo_folder_keeps_the_demo_patient(capsys, tiny_dataset, tmp_path, model):
    """`demo` writes patient/P03 beside its maps; predicting its inputs --out that folder used to
    delete patient/ (the folder was swapped whole)."""
    from OEFPredictorLib import io

    demo = tmp_path / "demo_output"
    with io.atomic_directory(demo, command="demo") as tmp:
        shutil.copytree(tiny_dataset / "P01", Path(tmp) / "patient" / "P01")
        (Path(tmp) / "patient" / "P01" / io.OUTPUT_MARKER).unlink()
        (Path(tmp) / "roi_stats.csv").write_text("roi,map\n")
    before = snapshot(demo)
    p = demo / "patient" / "P01"
    code, out, err = run_cli(capsys, "predict", "--echoes", p / "P01_MEGRE.nii.gz", "--qsm", p / "P01_Chimap.nii.gz",
                             "--mask", p / "P01_desc-brain_mask.nii.gz", "--model", model, "--device", "cpu",
                             "--out", demo, "--overwrite")
    assert code == 0, err
    after = snapshot(demo)
    assert all(after[n] == c for n, c in before.items() if n != io.OUTPUT_MARKER)
    assert io.read_manifest(demo)["oef.nii.gz"] == "predict"


def test_overwrite_keeps_inputs_and_foreign_files_and_drops_own_stale_outputs(capsys, patient, tmp_path, model):
    from OEFPredictorLib import io

    out = tmp_path / "maps"
    cbf = tmp_path / "cbf.nii.gz"
    qsm, geometry = io.read_volume(patient / "P01_Chimap.nii.gz")
    io.write_volume(np.full(qsm.shape, 50.0, np.float32), geometry, cbf)
    base = ["predict", "--echoes", patient / "P01_MEGRE.nii.gz", "--model", model, "--device", "cpu",
            "--out", out]
    code, _, err = run_cli(capsys, *base, "--qsm", patient / "P01_Chimap.nii.gz", "--cbf", cbf)
    assert code == 0, err
    assert (out / "cmro2.nii.gz").exists()
    # the user keeps the QSM and notes next to the earlier outputs, then reruns without --cbf
    shutil.copy(patient / "P01_Chimap.nii.gz", out / "my_qsm.nii.gz")
    (out / "notes.txt").write_text("mine")
    code, _, err = run_cli(capsys, *base, "--qsm", out / "my_qsm.nii.gz", "--overwrite")
    assert code == 0, err
    names = set(os.listdir(out))
    assert {"my_qsm.nii.gz", "notes.txt", "oef.nii.gz"} <= names
    assert "cmro2.nii.gz" not in names  # an output of the earlier run that this run did not make
    assert (out / "my_qsm.nii.gz").read_bytes() == (patient / "P01_Chimap.nii.gz").read_bytes()


def test_an_input_named_like_an_output_is_refused_before_any_work(capsys, patient, tmp_path, model):
    from OEFPredictorLib import io

    out = tmp_path / "maps"
    with io.atomic_directory(out, command="predict") as tmp:
        shutil.copy(patient / "P01_desc-brain_mask.nii.gz", Path(tmp) / "mask.nii.gz")
    before = snapshot(out)
    code, _, err = run_cli(capsys, "predict", "--echoes", patient / "P01_MEGRE.nii.gz", "--qsm",
                           patient / "P01_Chimap.nii.gz", "--mask", out / "mask.nii.gz", "--model", model,
                           "--out", out, "--overwrite")
    assert "is an input of this run" in one_line_error(code, err)
    assert snapshot(out) == before


def test_atomic_directory_never_replaces_an_input(tmp_path):
    from OEFPredictorLib import io

    out = tmp_path / "out"
    with io.atomic_directory(out, command="x") as tmp:
        (Path(tmp) / "a.txt").write_text("old")
    (out / "a.txt").write_text("now an input")
    with pytest.raises(io.InputError, match="is an input of this run"):
        with io.atomic_directory(out, overwrite=True, inputs=[out / "a.txt"], command="x") as tmp:
            (Path(tmp) / "a.txt").write_text("new")
    assert (out / "a.txt").read_text() == "now an input"
    assert not [p for p in out.iterdir() if ".partial" in p.name]


def test_simulate_overwrite_keeps_files_the_user_added(tmp_path):
    from OEFPredictorLib import simulate

    kw = dict(n_patients=1, seed=3, voxel_size=8.0, noise=simulate.NoiseModel(snr=None, qsm_noise_ppb=0.0))
    simulate.simulate_dataset(tmp_path, **kw)
    (tmp_path / "P01" / "my_segmentation.nii.gz").write_bytes(b"hand-drawn")
    simulate.simulate_dataset(tmp_path, overwrite=True, **kw)
    assert (tmp_path / "P01" / "my_segmentation.nii.gz").read_bytes() == b"hand-drawn"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_a_run_leaves_no_partial_folder(tmp_path, sig):
    env = dict(os.environ, PYTHONPATH=str(REPO / "OEFPredictor"))
    proc = subprocess.Popen([sys.executable, "-m", "OEFPredictorLib.cli", "simulate", "--out", str(tmp_path / "sim"),
                             "--patients", "3", "--voxel-size", "6", "--seed", "1"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, encoding="utf-8", errors="replace",
                            # a background job starts with SIGINT ignored; Python then never raises KeyboardInterrupt
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if (tmp_path / "sim").is_dir() and any(".partial" in p.name for p in (tmp_path / "sim").iterdir()):
            break
        time.sleep(0.005)
    else:
        proc.kill()
        pytest.fail("simulate never started a patient folder")
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, err
    assert ("terminated" if sig == signal.SIGTERM else "interrupted") in err
    assert not [p for p in (tmp_path / "sim").rglob("*") if ".partial" in p.name]


def _can_mount() -> bool:
    return sys.platform.startswith("linux") and os.geteuid() == 0 and shutil.which("mount") is not None


@pytest.mark.skipif(not _can_mount(), reason="needs root to mount a tmpfs")
def test_an_output_folder_that_is_a_mount_point(capsys, patient, tmp_path, model):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)]).returncode:
        pytest.skip("mount is not permitted here")
    try:
        args = ["predict", "--echoes", patient / "P01_MEGRE.nii.gz", "--qsm", patient / "P01_Chimap.nii.gz",
                "--model", model, "--device", "cpu", "--out", mnt, "--overwrite"]
        code, _, err = run_cli(capsys, *args)
        assert code == 0, err
        code, _, err = run_cli(capsys, *args)  # a rerun replaces the files on the mounted folder
        assert code == 0, err
        assert (mnt / "oef.nii.gz").exists()
        assert not [p for p in list(mnt.iterdir()) + list(tmp_path.iterdir()) if ".partial" in p.name]
    finally:
        subprocess.run(["umount", str(mnt)])


# --- Truncated files ----------------------------------------------------------------------------
def _truncate(path: Path, fraction: float = 0.6) -> None:
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(int(size * fraction))


@pytest.mark.parametrize("name,dtype", [("v.nii.gz", np.int16), ("v.nii.gz", np.float32), ("v.nii", np.uint8),
                                        ("v.nii", np.float32), ("v.mha", np.int16), ("v.nrrd", np.float32),
                                        ("v.mhd", np.float32)])
def test_a_truncated_image_is_refused_in_every_format(tmp_path, name, dtype):
    """ITK reads a truncated NIfTI as zeros for the missing part (OEF 14.5 pp off, a mask of half
    the brain, exit 0) and calls a truncated MetaImage "No such file or directory"."""
    from OEFPredictorLib import io

    rng = np.random.default_rng(0)
    volume = (rng.random((12, 20, 24)) * 200 + 1).astype(dtype)
    path = tmp_path / name
    io.write_volume(volume, io.Geometry((1.0, 1.0, 1.0), (0.0, 0.0, 0.0)), path)
    np.testing.assert_array_equal(io.read_volume(path, dtype=dtype)[0], volume)
    data = path.with_suffix(".zraw") if name.endswith(".mhd") else path
    if name.endswith(".mhd") and not data.exists():
        data = path.with_suffix(".raw")
    _truncate(data)
    with pytest.raises(io.InputError, match="the file is truncated|truncated or damaged"):
        io.read_volume(path)


def test_truncated_inputs_give_one_line_errors_in_predict_and_stats(capsys, patient, tmp_path, model):
    from OEFPredictorLib import io

    echoes, geometry = io.read_volume(patient / "P01_MEGRE.nii.gz")
    mask = io.read_volume(patient / "P01_desc-brain_mask.nii.gz", dtype=np.uint8)[0]
    io.write_volume(echoes.astype(np.int16), geometry, tmp_path / "megre_int16.nii.gz")
    shutil.copy(patient / "P01_MEGRE.json", tmp_path / "megre_int16.json")
    shutil.copy(patient / "P01_MEGRE.nii.gz", tmp_path / "megre_float.nii.gz")
    shutil.copy(patient / "P01_MEGRE.json", tmp_path / "megre_float.json")
    io.write_volume(mask, geometry, tmp_path / "mask_uint8.nii.gz")
    for name in ("megre_int16.nii.gz", "megre_float.nii.gz", "mask_uint8.nii.gz"):
        _truncate(tmp_path / name)
    qsm = patient / "P01_Chimap.nii.gz"
    for echo_file, extra in (("megre_int16.nii.gz", []), ("megre_float.nii.gz", []),
                             ("megre_float.nii.gz", [])):
        code, _, err = run_cli(capsys, "predict", "--echoes", tmp_path / echo_file, "--qsm", qsm, "--model", model,
                               "--out", tmp_path / "out", *extra)
        assert "is truncated" in one_line_error(code, err)
    code, _, err = run_cli(capsys, "predict", "--echoes", patient / "P01_MEGRE.nii.gz", "--qsm", qsm, "--mask",
                           tmp_path / "mask_uint8.nii.gz", "--model", model, "--out", tmp_path / "out")
    assert "mask_uint8.nii.gz: the file is truncated" in one_line_error(code, err)
    assert not (tmp_path / "out").exists()
    # stats: a truncated float map
    shutil.copy(patient / "P01_desc-truth_OEFmap.nii.gz", tmp_path / "oef.nii.gz")
    _truncate(tmp_path / "oef.nii.gz", 0.5)
    code, _, err = run_cli(capsys, "stats", "--map", tmp_path / "oef.nii.gz", "--labels", patient / "P01_dseg.nii.gz")
    assert "is truncated" in one_line_error(code, err, "stats")


def _write_dicom_series(folder: Path, volume: np.ndarray, echo_times_ms=None):
    """One DICOM file per slice (and echo), as a scanner exports them."""
    import SimpleITK as sitk

    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    echoes = [volume] if echo_times_ms is None else [volume * np.exp(-t / 30.0) for t in echo_times_ms]
    for e, array in enumerate(echoes):
        image = sitk.GetImageFromArray(array.astype(np.int16))
        for k in range(array.shape[0]):
            s = image[:, :, k]
            s.SetMetaData("0008|0060", "MR")
            s.SetMetaData("0020|000e", "1.2.826.0.1.3680043.2.1125.1")
            s.SetMetaData("0020|0032", f"0\\0\\{k}")
            s.SetMetaData("0020|0037", "1\\0\\0\\0\\1\\0")
            s.SetMetaData("0020|0013", str(k + 1))
            if echo_times_ms is not None:
                s.SetMetaData("0018|0081", f"{echo_times_ms[e]:g}")
            writer.SetFileName(str(folder / f"e{e}_{k:03d}.dcm"))
            writer.Execute(s)


def test_a_truncated_dicom_file_is_refused_not_skipped(tmp_path):
    """GDCM leaves a damaged file out of the series without a word: a slice would be missing."""
    from OEFPredictorLib import io

    volume = np.random.default_rng(1).integers(100, 1000, (6, 16, 20))
    _write_dicom_series(tmp_path / "dcm", volume, [4.5, 9.5])
    assert io.read_dicom_series(tmp_path / "dcm")[0].shape == (6, 16, 20, 2)
    _truncate(tmp_path / "dcm" / "e1_003.dcm", 0.8)
    with pytest.raises(io.InputError, match="e1_003.dcm: truncated or damaged"):
        io.read_dicom_series(tmp_path / "dcm")


# --- Writing: disk full ---------------------------------------------------------------------------
@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
@pytest.mark.parametrize("name", ["x.nii.gz", "x.nrrd"])
def test_a_write_to_a_full_disk_raises(tmp_path, name):
    """SimpleITK's WriteImage returns normally when the disk is full (/dev/full: every write fails
    with ENOSPC)."""
    import errno

    from OEFPredictorLib import io

    os.symlink("/dev/full", tmp_path / name)
    with pytest.raises(OSError) as info:
        io.write_volume(np.ones((3, 4, 5), np.float32), io.Geometry((1.0, 1.0, 1.0), (0.0, 0.0, 0.0)),
                        tmp_path / name)
    assert info.value.errno == errno.ENOSPC


@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_FSIZE as a stand-in for a full disk (Linux)")
def test_predict_on_a_full_disk_fails_in_one_line_and_keeps_nothing(patient, tmp_path, model):
    """A file size limit makes every write past 16 kB fail (EFBIG), as a full disk does (ENOSPC)."""
    import resource

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (16_000, 16_000))

    env = dict(os.environ, PYTHONPATH=str(REPO / "OEFPredictor"))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "OEFPredictorLib.cli", "predict", "--echoes",
                           str(patient / "P01_MEGRE.nii.gz"), "--qsm", str(patient / "P01_Chimap.nii.gz"),
                           "--model", model, "--device", "cpu", "--out", str(out)],
                          env=env, capture_output=True, encoding="utf-8", errors="replace", preexec_fn=limit,
                          timeout=300)
    assert "Could not write the output" in one_line_error(proc.returncode, _last_lines(proc.stderr))
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if ".partial" in p.name]


@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_FSIZE as a stand-in for a full disk (Linux)")
def test_stats_csv_on_a_full_disk_fails_in_one_line(patient, tmp_path):
    import resource

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (100, 100))  # less than the CSV's header line

    env = dict(os.environ, PYTHONPATH=str(REPO / "OEFPredictor"))
    proc = subprocess.run([sys.executable, "-m", "OEFPredictorLib.cli", "stats", "--map",
                           str(patient / "P01_desc-truth_OEFmap.nii.gz"), "--labels", str(patient / "P01_dseg.nii.gz"),
                           "--out", str(tmp_path / "stats.csv")],
                          env=env, capture_output=True, encoding="utf-8", errors="replace", preexec_fn=limit,
                          timeout=300)
    assert "Could not write the output" in one_line_error(proc.returncode, _last_lines(proc.stderr), "stats")
    assert not list(tmp_path.glob("*stats.csv*"))


def _last_lines(err: str) -> str:
    """stderr without the progress bar's lines."""
    return "\n".join(l for l in err.splitlines() if l.startswith("oefpredictor"))


# --- Unpredicted voxels are not 0 % -------------------------------------------------------------
def test_stats_leaves_out_unpredicted_voxels_by_default(capsys, patient, tmp_path, model):
    """The maps are 0 where nothing was predicted (here a NaN QSM voxel and its neighbours' mask
    edge) and 0 % is a valid OEF: `stats` uses the prediction's mask.nii.gz beside the map."""
    from OEFPredictorLib import io, roistats

    qsm, geometry = io.read_volume(patient / "P01_Chimap.nii.gz")
    brain = io.read_volume(patient / "P01_desc-brain_mask.nii.gz")[0] > 0
    holes = np.argwhere(brain)[::97][:20]
    qsm[tuple(holes.T)] = np.nan
    io.write_volume(qsm, geometry, tmp_path / "qsm_nan.nrrd")  # NRRD keeps NaN
    out = tmp_path / "maps"
    code, _, err = run_cli(capsys, "predict", "--echoes", patient / "P01_MEGRE.nii.gz", "--qsm",
                           tmp_path / "qsm_nan.nrrd", "--mask", patient / "P01_desc-brain_mask.nii.gz",
                           "--model", model, "--device", "cpu", "--out", out)
    assert code == 0, err
    predicted = io.read_volume(out / "mask.nii.gz")[0] > 0  # always written
    assert predicted.sum() == brain.sum() - len(holes)
    oef = io.read_volume(out / "oef.nii.gz")[0]
    io.write_volume(brain.astype(np.uint8), geometry, tmp_path / "brain_labels.nii.gz")
    csv = tmp_path / "stats.csv"
    code, _, err = run_cli(capsys, "stats", "--map", out / "oef.nii.gz", "--labels", tmp_path / "brain_labels.nii.gz",
                           "--out", csv)
    assert code == 0, err
    row = roistats.read_csv(csv)[0]
    assert row["n_voxels"] == brain.sum() and row["n_unpredicted"] == len(holes)
    assert row["n_valid"] == predicted.sum()
    assert row["mean"] == pytest.approx(float(oef[predicted].astype(np.float64).mean()), rel=1e-9)
    # without the prediction mask the holes count as 0 % (what any reader of the bare map sees)
    code, _, err = run_cli(capsys, "stats", "--map", out / "oef.nii.gz", "--labels", tmp_path / "brain_labels.nii.gz",
                           "--no-prediction-mask", "--out", csv)
    assert code == 0, err
    row = roistats.read_csv(csv)[0]
    assert row["n_unpredicted"] == 0 and row["n_valid"] == brain.sum()
    assert row["mean"] < float(oef[predicted].mean())


def test_slicer_roi_table_leaves_out_unpredicted_voxels(tiny_dataset):
    """The Slicer module's ROI table (real MRML of slicer-core): the Logic keeps the prediction's
    mask with its output nodes and roistats leaves the other voxels out."""
    slicer = pytest.importorskip("slicer")
    import OEFPredictor as module
    from OEFPredictorLib import roistats, simulate
    from slicer_testing import add_echo_volumes, ijk_to_ras, slicer_scene

    slicer_scene()
    p = simulate.load_patient(tiny_dataset / "P01", with_truth=False)
    z = slice(17, 27)
    echoes, qsm, brain = p.echoes[z].copy(), p.qsm[z].copy(), p.mask[z].copy()
    holes = np.argwhere(brain)[::53][:12]
    qsm[tuple(holes.T)] = np.nan
    import dataclasses

    slab = dataclasses.replace(p, echoes=echoes, qsm=qsm, mask=brain)
    m = ijk_to_ras(p.geometry)
    echoNodes = add_echo_volumes(slab)
    qsmNode = slicer.util.addVolumeFromArray(qsm, m, "QSM")
    maskNode = slicer.util.addVolumeFromArray(brain.astype(np.uint8), m, "brain",
                                              nodeClassName="vtkMRMLLabelMapVolumeNode")
    logic = module.OEFPredictorLogic()
    outputs = logic.process(echoNodes, qsmNode, mask=maskNode, echoTimesMs=p.protocol.echo_times_ms,
                            model=str(tiny_model_path(str(tiny_dataset))), device="cpu")
    table = logic.computeRoiStatistics({"OEF": outputs["OEF"]}, maskNode)
    rows = logic.tableRows(table)
    oef = slicer.util.arrayFromVolume(outputs["OEF"])
    predicted = brain.copy()
    predicted[tuple(holes.T)] = False
    assert rows[0]["n_unpredicted"] == len(holes) and rows[0]["n_valid"] == predicted.sum()
    assert rows[0]["mean"] == pytest.approx(float(oef[predicted].astype(np.float64).mean()), rel=1e-9)
    assert roistats.COLUMNS.index("n_unpredicted") < roistats.COLUMNS.index("n_valid")


# --- Plausibility gate ----------------------------------------------------------------------------
def _patients_at_every_snr():
    """All 17 virtual patients of a data set (8 mm), each without noise and at SNR 20-200."""
    from OEFPredictorLib import phantom, physics, simulate

    protocol = physics.Protocol.default()
    for index in range(1, simulate.N_PATIENTS + 1):
        anatomy, noise_seed = simulate.patient_seed(0, index).spawn(2)
        fraction = simulate.TRAINING_INDEPENDENT_FRACTION if simulate.split_of(simulate.patient_id(index)) == "train" else 0.0
        patient = phantom.make_patient(anatomy, phantom.PatientConfig(voxel_size=8.0, independent_fraction=fraction))
        for snr in (None, 20.0, 50.0, 100.0, 200.0):
            noise = simulate.NoiseModel(snr=snr, qsm_noise_ppb=2.0 if snr else 0.0)
            echoes, qsm, _ = simulate.synthesize(patient.params, patient.mask, protocol, noise,
                                                 np.random.default_rng(noise_seed))
            yield index, snr, patient, echoes, qsm, protocol


@pytest.mark.slow
def test_the_plausibility_gate_passes_every_simulated_patient_at_every_snr():
    from OEFPredictorLib import plausibility, predict

    worst = 0.0
    for index, snr, patient, echoes, qsm, protocol in _patients_at_every_snr():
        for mask in (patient.mask, None):  # with a mask, and with a mask derived from echo 1
            assert plausibility.check_inputs(echoes, qsm, mask, protocol.echo_times_ms) == []
        # the fit check on the quality of the true parameters (the noise floor) ...
        idx = np.flatnonzero(patient.mask)
        rows = echoes.reshape(-1, 8)[idx]
        truth = {k: v.reshape(-1)[idx] for k, v in patient.params.items()}
        quality = predict.quality_map(rows, qsm.reshape(-1)[idx], truth, protocol)
        worst = max(worst, float(np.median(quality)))
        assert plausibility.check_fit(quality) == []
        # ... and of the bundled voxelwise network's prediction, end to end
        if snr in (20.0, 200.0):
            result = predict.predict_maps(predict.PredictionInputs(echoes, qsm, protocol, mask=patient.mask),
                                          method="dnn", device="cpu")
            assert not [w for w in result.warnings if "do not fit" in w], (index, snr)
    assert worst < plausibility.MAX_MEDIAN_QUALITY / 2  # a wide margin, not a near miss


@pytest.fixture(scope="module")
def valid_case(tiny_noisy_dataset):
    from OEFPredictorLib import simulate

    return simulate.load_patient(tiny_noisy_dataset / "P03", with_truth=False)


@pytest.mark.parametrize("case,message", [
    ("qsm_ppb", "looks like ppb"),
    ("qsm_zero", "0 everywhere"),
    ("qsm_constant", "same value"),
    ("echoes_reversed", "does not decay"),
    ("echoes_shuffled", "look shuffled"),
    ("echoes_clipped", "look clipped"),
])
def test_the_plausibility_gate_refuses(valid_case, case, message):
    from OEFPredictorLib import predict

    p = valid_case
    echoes, qsm = p.echoes, p.qsm
    if case == "qsm_ppb":
        qsm = qsm * 1000.0
    elif case == "qsm_zero":
        qsm = np.zeros_like(qsm)
    elif case == "qsm_constant":
        qsm = np.full_like(qsm, 0.05)
    elif case == "echoes_reversed":
        echoes = echoes[..., ::-1]
    elif case == "echoes_shuffled":
        echoes = echoes[..., [0, 1, 5, 2, 6, 3, 7, 4]]
    elif case == "echoes_clipped":  # floats cast to uint16 with too large a scale
        echoes = np.minimum(echoes * (65535.0 / np.percentile(echoes[p.mask], 30)), 65535.0).astype(np.uint16)
    for mask in (p.mask, None):
        with pytest.raises(predict.InputError, match=message):
            predict.PredictionInputs(echoes, qsm, p.protocol, mask=mask).validate()


def test_a_bad_fit_is_named_in_a_warning(valid_case):
    """Echoes at SNR 3 (Rician noise added to the SNR-100 patient) pass the input gate, but the
    model cannot explain them: the bundled DNN's prediction runs and says so (and does not for the
    same patient without the added noise)."""
    from OEFPredictorLib import predict

    p = valid_case
    rng = np.random.default_rng(0)
    sigma = p.echoes[..., 0][p.mask].mean() / 3.0
    noisy = np.hypot(p.echoes + sigma * rng.standard_normal(p.echoes.shape),
                     sigma * rng.standard_normal(p.echoes.shape)).astype(np.float32)
    for echoes, bad in ((p.echoes, False), (noisy, True)):
        result = predict.predict_maps(predict.PredictionInputs(echoes, p.qsm, p.protocol, mask=p.mask),
                                      method="dnn", device="cpu")
        assert bool([w for w in result.warnings if "do not fit the model" in w]) == bad


def test_te_contradicting_the_sidecar_says_which_was_used(capsys, patient, tmp_path, model):
    te = ",".join(f"{4.5 + 5 * i:g}" for i in range(8))
    sidecar = json.loads((patient / "P01_MEGRE.json").read_text())
    sidecar["EchoTime"] = [t * 1.1 for t in sidecar["EchoTime"]]
    shutil.copy(patient / "P01_MEGRE.nii.gz", tmp_path / "megre.nii.gz")
    (tmp_path / "megre.json").write_text(json.dumps(sidecar))
    code, _, err = run_cli(capsys, "predict", "--echoes", tmp_path / "megre.nii.gz", "--te", te, "--qsm",
                           patient / "P01_Chimap.nii.gz", "--model", model, "--device", "cpu", "--out",
                           tmp_path / "out")
    assert code == 0, err
    warnings = [l for l in err.splitlines() if "contradicts the sidecar megre.json" in l]
    assert len(warnings) == 1 and "--te was used" in warnings[0]
    record = json.loads((tmp_path / "out" / "prediction.json").read_text())
    assert any("contradicts" in w for w in record["warnings"])


# --- Tracebacks that became one-line errors ----------------------------------------------------------
@pytest.mark.parametrize("change,message", [
    (lambda c: c.pop("window"), "'window' is missing"),
    (lambda c: c.update(window={"length": "five", "target": "centre"}), "'window' needs 'length'"),
    (lambda c: c.update(window={"length": 5, "target": "middle"}), "'window' needs 'target'"),
    (lambda c: c.pop("output_scaling"), "'output_scaling' is missing"),
    (lambda c: c["output_scaling"].pop("std"), "'output_scaling' needs 'mean' and 'std'"),
    (lambda c: c["output_scaling"].update(mean=[0.0, 1.0]), "lists of 5 numbers"),
    (lambda c: c.update(protocol={"echo_times_s": [0.0045]}), "'protocol'"),
])
def test_a_malformed_model_card_is_one_line(capsys, patient, tmp_path, model, change, message):
    from OEFPredictorLib import models, predict

    broken = tmp_path / "m.keras"
    shutil.copy(model, broken)
    card = json.loads(models.card_path_for(model).read_text())
    change(card)
    models.card_path_for(broken).write_text(json.dumps(card))
    predict._load_cached.cache_clear()
    code, _, err = run_cli(capsys, "predict", "--echoes", patient / "P01_MEGRE.nii.gz", "--qsm",
                           patient / "P01_Chimap.nii.gz", "--model", broken, "--out", tmp_path / "out")
    line = one_line_error(code, err)
    assert "not a valid model card" in line and message in line


def test_a_lambda_layer_refusal_says_why(capsys, patient, tmp_path):
    import keras

    from OEFPredictorLib import models, physics

    inputs = keras.Input((5, 9))
    outputs = keras.layers.Lambda(lambda x: x[:, 0, :5] * 2.0)(inputs)
    card = models.make_card({"architecture": "lstm"}, physics.Protocol.default(),
                            {"mean": [0.0] * 5, "std": [1.0] * 5}, 5, "centre")
    path = models.save_bundle(keras.Model(inputs, outputs), card, tmp_path / "lambda.keras")
    code, _, err = run_cli(capsys, "predict", "--echoes", patient / "P01_MEGRE.nii.gz", "--qsm",
                           patient / "P01_Chimap.nii.gz", "--model", path, "--out", tmp_path / "out")
    line = one_line_error(code, err)
    assert "safe mode" in line and "Lambda" in line and line.rstrip().endswith(".")


def test_evaluate_out_that_is_a_file_is_refused_before_the_run(capsys, tiny_dataset, tmp_path):
    blocker = tmp_path / "report.md"
    blocker.write_text("mine")
    start = time.perf_counter()
    code, out, err = run_cli(capsys, "evaluate", "--data", tiny_dataset, "--methods", "tissue_mean",
                             "--patients", "P02", "--out", blocker)
    assert "not a writable folder" in one_line_error(code, err, "evaluate")
    assert out == ""  # nothing was evaluated
    assert blocker.read_text() == "mine"


# --- Misleading messages -----------------------------------------------------------------------------
def test_a_direction_mismatch_shows_the_directions(capsys, patient, tmp_path, model):
    from OEFPredictorLib import io

    qsm, g = io.read_volume(patient / "P01_Chimap.nii.gz")
    d = np.array(g.direction).reshape(3, 3)
    d[1] *= -1  # flip one axis: same size, spacing and origin
    flipped = io.Geometry(g.spacing, g.origin, tuple(d.ravel()))
    io.write_volume(qsm, flipped, tmp_path / "qsm_flipped.nii.gz")
    code, _, err = run_cli(capsys, "predict", "--echoes", patient / "P01_MEGRE.nii.gz", "--qsm",
                           tmp_path / "qsm_flipped.nii.gz", "--model", model, "--out", tmp_path / "out")
    line = one_line_error(code, err)
    assert io.describe_direction(flipped) in line and io.describe_direction(g) in line
    code, _, err = run_cli(capsys, "stats", "--map", tmp_path / "qsm_flipped.nii.gz", "--labels",
                           patient / "P01_dseg.nii.gz")
    line = one_line_error(code, err, "stats")
    assert io.describe_direction(flipped) in line and io.describe_direction(g) in line


def test_a_field_strength_mismatch_is_called_so(capsys, patient, tmp_path, model):
    sidecar = json.loads((patient / "P01_MEGRE.json").read_text())
    sidecar["MagneticFieldStrength"] = 1.5
    shutil.copy(patient / "P01_MEGRE.nii.gz", tmp_path / "megre.nii.gz")
    (tmp_path / "megre.json").write_text(json.dumps(sidecar))
    code, _, err = run_cli(capsys, "predict", "--echoes", tmp_path / "megre.nii.gz", "--qsm",
                           patient / "P01_Chimap.nii.gz", "--model", model, "--out", tmp_path / "out")
    line = one_line_error(code, err)
    assert "differs in its field strength" in line and "echo times" not in line.split("model's")[0][-40:]


def test_a_dicom_folder_without_echo_times_names_the_tag(tmp_path):
    from OEFPredictorLib import io

    volume = np.random.default_rng(2).integers(100, 1000, (5, 12, 14))
    _write_dicom_series(tmp_path / "dcm", volume)
    with pytest.raises(io.InputError, match=r"no EchoTime tag \(0018,0081\)"):
        io.read_echo_series([tmp_path / "dcm"], [4.5, 9.5])


def test_a_non_zip_model_file_is_not_called_missing(capsys, patient, tmp_path, model):
    from OEFPredictorLib import models

    fake = tmp_path / "fake.keras"
    fake.write_bytes(b"not a zip archive\n" * 20)
    card = json.loads(models.card_path_for(model).read_text())
    card["sha256"] = models.sha256_of(fake)
    models.card_path_for(fake).write_text(json.dumps(card))
    code, _, err = run_cli(capsys, "predict", "--echoes", patient / "P01_MEGRE.nii.gz", "--qsm",
                           patient / "P01_Chimap.nii.gz", "--model", fake, "--out", tmp_path / "out")
    line = one_line_error(code, err)
    assert "not a Keras model archive" in line and "not found" not in line.lower()


def test_no_numpy_reprs_in_messages(capsys, patient, tmp_path, model):
    shutil.copy(patient / "P01_MEGRE.nii.gz", tmp_path / "megre.nii.gz")
    (tmp_path / "megre.json").write_text('{"EchoTime": [0.0045, NaN, 0.0145, 0.0195, 0.0245, 0.0295, 0.0345, 0.0395]}')
    code, _, err = run_cli(capsys, "predict", "--echoes", tmp_path / "megre.nii.gz", "--qsm",
                           patient / "P01_Chimap.nii.gz", "--model", model, "--out", tmp_path / "out")
    line = one_line_error(code, err)
    assert "np." not in line and "EchoTime" in line
    from OEFPredictorLib import physics

    with pytest.raises(ValueError) as info:
        physics.Protocol(tuple(np.array([0.0095, 0.0045])))
    assert "np.float64" not in str(info.value)


def test_warnings_are_printed_once(capsys, patient, tmp_path, model):
    from OEFPredictorLib import io

    qsm, geometry = io.read_volume(patient / "P01_Chimap.nii.gz")
    brain = io.read_volume(patient / "P01_desc-brain_mask.nii.gz")[0] > 0
    qsm[tuple(np.argwhere(brain)[0])] = np.nan
    io.write_volume(qsm, geometry, tmp_path / "qsm.nrrd")
    code, _, err = run_cli(capsys, "predict", "--echoes", patient / "P01_MEGRE.nii.gz", "--qsm", tmp_path / "qsm.nrrd",
                           "--mask", patient / "P01_desc-brain_mask.nii.gz", "--model", model, "--device", "cpu",
                           "--out", tmp_path / "out")
    assert code == 0, err
    assert err.count("1 voxel(s) with NaN/Inf") == 1, err


def test_bad_inputs_table_is_current():
    """docs/bad_inputs.md lists every case of docs/bad_inputs.py (rebuild it with that script), and
    every test it names exists."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bad_inputs", REPO / "docs" / "bad_inputs.py")
    table = importlib.util.module_from_spec(spec)
    sys.modules["bad_inputs"] = table  # dataclasses look their module up there
    spec.loader.exec_module(table)
    rows = [l for l in (REPO / "docs" / "bad_inputs.md").read_text(encoding="utf-8").splitlines()
            if l.startswith("| ") and not l.startswith(table.HEADER[0])]
    assert len(rows) == len(table.CASES), "rebuild: python docs/bad_inputs.py"
    for i, (row, case) in enumerate(zip(rows, table.CASES), 1):
        cells = [c.strip() for c in row.strip("|").split(" | ")]
        assert cells[0] == str(i) and cells[1] == case.section and cells[2] == case.given, row
        assert cells[-1].strip("`") == case.test
        if "::" in case.test:
            path, name = case.test.split("::")
            assert f"def {name}(" in (REPO / path).read_text(encoding="utf-8"), case.test
