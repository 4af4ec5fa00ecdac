"""Inputs as scanners and pipelines write them (issue 20): the field strength is read from the
BIDS sidecar, the DICOM tag (0018,0087) or --field-strength and never assumed; a mask that holds
non-brain voxels is named in a warning; without a mask, the default mask is where the QSM is
defined. Real files (SimpleITK/GDCM), the real engine (the QQ fit, nlls: no model needed)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from OEFPredictorLib import io, plausibility, predict, simulate
from OEFPredictorLib.cli import main


@pytest.fixture(scope="module")
def patient(tiny_noisy_dataset):
    return simulate.load_patient(tiny_noisy_dataset / "P01", with_truth=False)


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _copy_without_field(folder, tmp_path):
    files = simulate.patient_files(folder)
    shutil.copy(files["echoes"], tmp_path / "megre.nii.gz")
    sidecar = json.loads(files["sidecar"].read_text())
    sidecar.pop("MagneticFieldStrength")
    (tmp_path / "megre.json").write_text(json.dumps(sidecar))
    return tmp_path / "megre.nii.gz", files


def test_data_without_a_field_strength_is_refused_and_given_one_is_recorded(tiny_noisy_dataset, tmp_path, capsys):
    echoes, files = _copy_without_field(tiny_noisy_dataset / "P01", tmp_path)
    code, out, err = run_cli(capsys, "predict", "--echoes", echoes, "--qsm", files["qsm"], "--method", "nlls",
                             "--out", tmp_path / "a")
    assert code == 2 and err.count("\n") == 1 and not (tmp_path / "a").exists()
    assert "field strength of megre.nii.gz is unknown" in err and "--field-strength" in err
    # 7 T data: the field given is the one used, and recorded
    code, out, err = run_cli(capsys, "predict", "--echoes", echoes, "--qsm", files["qsm"], "--method", "nlls",
                             "--field-strength", "7", "--mask", files["mask"], "--out", tmp_path / "b")
    assert code == 0, err
    record = json.loads((tmp_path / "b" / "prediction.json").read_text())
    assert record["protocol"]["field_strength_T"] == 7.0
    # a sidecar that says 1.5 T: used as such (no 3 T), and recorded
    sidecar = json.loads((tmp_path / "megre.json").read_text())
    (tmp_path / "megre.json").write_text(json.dumps({**sidecar, "MagneticFieldStrength": 1.5}))
    code, out, err = run_cli(capsys, "predict", "--echoes", echoes, "--qsm", files["qsm"], "--method", "nlls",
                             "--mask", files["mask"], "--out", tmp_path / "c")
    assert code == 0, err
    assert json.loads((tmp_path / "c" / "prediction.json").read_text())["protocol"]["field_strength_T"] == 1.5


def test_the_field_strength_changes_the_maps(patient):
    """Why it must never be assumed: the same data read at 3 T and at 7 T give other OEF maps."""
    from OEFPredictorLib import physics

    maps = {}
    for field in (3.0, 7.0):
        protocol = physics.Protocol(patient.protocol.echo_times, field)
        inputs = predict.PredictionInputs(patient.echoes, patient.qsm, protocol, mask=patient.mask)
        maps[field] = predict.predict_maps(inputs, method="nlls", device="cpu").maps["OEF"][patient.mask]
    assert abs(float(np.mean(maps[3.0]) - np.mean(maps[7.0]))) > 3.0


@pytest.mark.parametrize("value, expected", [("7", 7.0), (None, None)])
def test_the_dicom_field_strength_tag_is_read(patient, tmp_path, value, expected):
    import SimpleITK as sitk

    g = patient.geometry
    volume = np.round(patient.echoes[..., :2] / patient.echoes.max() * 30000.0)
    folder = tmp_path / "dcm"
    folder.mkdir()
    for e, te in enumerate((4.5, 9.5)):
        image = sitk.GetImageFromArray(volume[..., e].astype(np.int16))
        g.apply_to(image)
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()
        uid = f"1.2.826.0.1.3680043.2.1125.{e + 2}"
        for k in range(image.GetDepth()):
            s = image[:, :, k]
            tags = {"0008|0060": "MR", "0020|000d": "1.2.826.0.1.3680043.2.1125.1", "0020|000e": uid,
                    "0020|0013": str(k + 1), "0018|0081": f"{te:g}", "0008|0018": f"{uid}.{k + 1}",
                    "0020|0032": "\\".join(f"{v:.6f}" for v in image.TransformIndexToPhysicalPoint((0, 0, k))),
                    "0020|0037": "\\".join(f"{v:.6f}" for v in (g.direction[0], g.direction[3], g.direction[6],
                                                                g.direction[1], g.direction[4], g.direction[7]))}
            if value is not None:
                tags["0018|0087"] = value
            for tag, text in tags.items():
                s.SetMetaData(tag, text)
            writer.SetFileName(str(folder / f"e{e}_{k:03d}.dcm"))
            writer.Execute(s)
    _, _, tes, field = io.read_echo_series([folder])
    assert tes == [4.5, 9.5] and field == expected
    if expected is None:
        from OEFPredictorLib.errors import InputError

        with pytest.raises(InputError, match=r"no MagneticFieldStrength tag \(0018,0087\).*--field-strength in tesla"):
            io.resolve_field_strength([folder], None, field, [])


def _with_skull(patient, qsm_outside):
    """The brain mask grown by two voxels (skull and scalp in it); the QSM there as a pipeline
    leaves it (0) or filled with small noise (a full-field QSM)."""
    from scipy import ndimage

    grown = ndimage.binary_dilation(patient.mask, iterations=2)
    qsm = patient.qsm.copy()
    if qsm_outside == "noise":
        rng = np.random.default_rng(4)
        qsm[~patient.mask] = rng.normal(0.0, 0.02, int((~patient.mask).sum()))
    return grown, qsm


@pytest.mark.parametrize("qsm_outside, sign", [("zero", "QSM is exactly 0"), ("noise", "no tissue signal")])
def test_a_mask_with_skull_is_named_in_a_warning(patient, qsm_outside, sign):
    grown, qsm = _with_skull(patient, qsm_outside)
    tes = patient.protocol.echo_times_ms
    assert plausibility.check_inputs(patient.echoes, qsm, patient.mask, tes) == []  # the brain mask: quiet
    warnings = plausibility.check_inputs(patient.echoes, qsm, grown, tes)
    assert len(warnings) == 1 and "non-brain tissue" in warnings[0] and sign in warnings[0]
    result = predict.predict_maps(predict.PredictionInputs(patient.echoes, qsm, patient.protocol, mask=grown),
                                  method="nlls", device="cpu")
    assert any("non-brain tissue" in w for w in result.warnings)


def test_without_a_mask_the_mask_is_where_the_qsm_is_defined(patient, tiny_noisy_dataset, tmp_path, capsys):
    qsm = np.where(patient.mask, patient.qsm, 0.0).astype(np.float32)
    echoes = patient.echoes.copy()
    echoes[~patient.mask] += 50.0  # a bright background: echo 1 alone would take some of it
    result = predict.predict_maps(predict.PredictionInputs(echoes, qsm, patient.protocol), method="nlls",
                                  device="cpu")
    assert result.mask_derived and result.mask_source == predict.MASK_FROM_QSM
    assert np.array_equal(result.mask, patient.mask & (qsm != 0))
    # a QSM defined everywhere gives no mask: echo 1 does, and the result says so
    full = np.where(patient.mask, patient.qsm, 0.01).astype(np.float32)
    other = predict.predict_maps(predict.PredictionInputs(patient.echoes, full, patient.protocol), method="nlls",
                                 device="cpu")
    assert other.mask_source == predict.MASK_FROM_ECHO1
    # the command line says which mask it used, before its result line
    files = simulate.patient_files(tiny_noisy_dataset / "P01")
    code, out, err = run_cli(capsys, "predict", "--echoes", files["echoes"], "--qsm", files["qsm"], "--method",
                             "nlls", "--out", tmp_path / "o")
    assert code == 0, err
    assert "note: no --mask given; the mask (mask.nii.gz) is derived: where the QSM is defined" in err
    record = json.loads((tmp_path / "o" / "prediction.json").read_text())
    assert record["mask_derived"] and "QSM is defined" in record["mask"]


def test_a_patient_folder_without_the_field_strength_is_refused(tiny_dataset, tmp_path, capsys):
    """`montage` and `evaluate` read patient folders: a sidecar without MagneticFieldStrength is
    refused in one line (it was read as 3 T)."""
    folder = tmp_path / "P01"
    shutil.copytree(tiny_dataset / "P01", folder)
    side = folder / "P01_MEGRE.json"
    data = json.loads(side.read_text())
    data.pop("MagneticFieldStrength")
    side.write_text(json.dumps(data))
    code, out, err = run_cli(capsys, "montage", folder, "--out", tmp_path / "m.png")
    assert code == 2 and err.count("\n") == 1 and "no MagneticFieldStrength" in err
    assert not (tmp_path / "m.png").exists()
