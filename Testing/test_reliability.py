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
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, encoding="utf-8", errors="replace")
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
    with pytest.raises(io.InputError, match="truncated"):
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


def _last_lines(err: str) -> str:
    """stderr without the progress bar's lines."""
    return "\n".join(l for l in err.splitlines() if l.startswith("oefpredictor"))
