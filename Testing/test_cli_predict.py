"""`oefpredictor predict` and `oefpredictor demo` end to end: outputs, and bad inputs that give a
one-line error, exit code 2 and no partial output."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from predict_testutils import tiny_model_path

TE_MS = "4.5,9.5,14.5,19.5,24.5,29.5,34.5,39.5"


@pytest.fixture(scope="module")
def model(tiny_dataset):
    return str(tiny_model_path(str(tiny_dataset)))


@pytest.fixture(scope="module")
def files(tiny_dataset, tmp_path_factory):
    """The tiny patient cut to a 10-slice slab (fast), as NIfTI with a BIDS sidecar."""
    from OEFPredictorLib import io, simulate

    p = simulate.load_patient(tiny_dataset / "P01", with_truth=False)
    d = tmp_path_factory.mktemp("predict_inputs")
    z = slice(17, 27)
    io.write_volume(p.echoes[z], p.geometry, d / "megre.nii.gz")
    io.write_json({"EchoTime": list(p.protocol.echo_times), "MagneticFieldStrength": 3.0}, d / "megre.json")
    io.write_volume(p.echoes[z], p.geometry, d / "nosidecar.nii.gz")
    io.write_volume(p.qsm[z], p.geometry, d / "qsm.nii.gz")
    io.write_volume(p.mask[z].astype(np.uint8), p.geometry, d / "mask.nii.gz")
    return {"dir": d, "echoes": d / "megre.nii.gz", "qsm": d / "qsm.nii.gz", "mask": d / "mask.nii.gz",
            "geometry": p.geometry, "shape": p.qsm[z].shape, "arrays": (p.echoes[z], p.qsm[z], p.mask[z])}


def run_cli(capsys, *argv):
    from OEFPredictorLib.cli import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_refused(capsys, tmp_path, argv, message):
    out_dir = tmp_path / "out"
    code, out, err = run_cli(capsys, *argv, "--out", out_dir)
    lines = [l for l in err.splitlines() if l.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("oefpredictor predict: error:"), err
    assert message in lines[0], lines[0]
    assert not out_dir.exists()
    assert not [p for p in tmp_path.iterdir() if ".partial" in p.name]  # no temporary leftovers


def test_predict_writes_every_map_with_the_input_geometry(capsys, tmp_path, files, model):
    from OEFPredictorLib import io, predict

    cbf = tmp_path / "cbf.nii.gz"
    io.write_volume(np.full(files["shape"], 50.0, np.float32), files["geometry"], cbf)
    out_dir = tmp_path / "maps"
    code, out, err = run_cli(capsys, "predict", "--echoes", files["echoes"], "--qsm", files["qsm"], "--cbf", cbf,
                             "--model", model, "--device", "cpu", "--out", out_dir)
    assert code == 0, err
    names = {"oef.nii.gz", "S0.nii.gz", "R2.nii.gz", "Y.nii.gz", "v.nii.gz", "chi_nb.nii.gz", "quality.nii.gz",
             "cmro2.nii.gz", "mask.nii.gz", "prediction.json", io.OUTPUT_MARKER}
    assert set(os.listdir(out_dir)) == names
    assert str(out_dir) in out and " s " in out
    oef, g = io.read_volume(out_dir / "oef.nii.gz")
    assert g.matches(files["geometry"]) and oef.shape == files["shape"]
    mask = io.read_volume(out_dir / "mask.nii.gz")[0] > 0
    assert np.all(oef[~mask] == 0) and 0 < oef[mask].mean() < 100
    # the same numbers as the engine on the same arrays (TEs from the BIDS sidecar)
    echoes, qsm, _ = files["arrays"]
    from OEFPredictorLib import physics

    ref = predict.predict_maps(predict.PredictionInputs(echoes, qsm, physics.Protocol.default()), model=model,
                               device="cpu")
    np.testing.assert_allclose(oef, ref.maps["OEF"], rtol=1e-5, atol=1e-4)
    cmro2 = io.read_volume(out_dir / "cmro2.nii.gz")[0]
    np.testing.assert_allclose(cmro2[mask], 50 * oef[mask] / 100 * 7.377, rtol=1e-4)
    record = json.loads((out_dir / "prediction.json").read_text())
    assert record["mask_derived"] and record["protocol"]["echo_times_ms"][0] == 4.5
    # an existing output folder is refused (and kept as it was) unless --overwrite
    code, _, err = run_cli(capsys, "predict", "--echoes", files["echoes"], "--qsm", files["qsm"],
                           "--mask", files["mask"], "--model", model, "--out", out_dir)
    assert code == 2 and "already exists" in err and "--overwrite" in err
    assert (out_dir / "cmro2.nii.gz").exists()
    code, _, err = run_cli(capsys, "predict", "--echoes", files["echoes"], "--qsm", files["qsm"],
                           "--mask", files["mask"], "--model", model, "--out", out_dir, "--overwrite")
    assert code == 0, err
    assert "cmro2.nii.gz" not in os.listdir(out_dir)  # the earlier run's, not made again: removed
    np.testing.assert_array_equal(io.read_volume(out_dir / "mask.nii.gz")[0] > 0, files["arrays"][2])  # always written


def _write(files, tmp_path, name, array, geometry=None):
    from OEFPredictorLib import io

    path = tmp_path / name
    io.write_volume(array, geometry or files["geometry"], path)
    return path


def test_refuses_qsm_of_another_size(capsys, tmp_path, files, model):
    qsm = _write(files, tmp_path, "qsm_small.nii.gz", files["arrays"][1][:, :-2])
    assert_refused(capsys, tmp_path, ["predict", "--echoes", files["echoes"], "--qsm", qsm, "--model", model],
                   "not on the same voxel grid")


def test_refuses_qsm_of_another_geometry_naming_both(capsys, tmp_path, files, model):
    from OEFPredictorLib import io

    g = files["geometry"]
    qsm = _write(files, tmp_path, "qsm_2mm.nii.gz", files["arrays"][1], io.Geometry((2.0, 2.0, 2.0), g.origin, g.direction))
    assert_refused(capsys, tmp_path, ["predict", "--echoes", files["echoes"], "--qsm", qsm, "--model", model],
                   "spacing (2, 2, 2) mm")


def test_refuses_a_mask_of_another_geometry(capsys, tmp_path, files, model):
    from OEFPredictorLib import io

    g = files["geometry"]
    shifted = io.Geometry(g.spacing, tuple(o + 10 for o in g.origin), g.direction)
    mask = _write(files, tmp_path, "mask_shifted.nii.gz", files["arrays"][2].astype(np.uint8), shifted)
    assert_refused(capsys, tmp_path, ["predict", "--echoes", files["echoes"], "--qsm", files["qsm"], "--mask", mask,
                                      "--model", model], "the mask (mask_shifted.nii.gz)")


@pytest.mark.parametrize("n_echoes", [7, 9])
def test_refuses_another_echo_count_naming_the_model_protocol(capsys, tmp_path, files, model, n_echoes):
    echoes = files["arrays"][0]
    if n_echoes == 9:
        echoes = np.concatenate([echoes, echoes[..., -1:] * 0.9], axis=-1)
    path = _write(files, tmp_path, f"megre{n_echoes}.nii.gz", echoes[..., :n_echoes])
    te = ",".join(f"{4.5 + 5 * i:g}" for i in range(n_echoes))
    assert_refused(capsys, tmp_path, ["predict", "--echoes", path, "--te", te, "--field-strength", "3", "--qsm", files["qsm"],
                                      "--model", model], "model's (8 echoes at TE = [4.5, 9.5")


def test_refuses_other_echo_times(capsys, tmp_path, files, model):
    te = ",".join(f"{5 + 5 * i:g}" for i in range(8))  # (no sidecar: it would add a warning that --te wins)
    assert_refused(capsys, tmp_path, ["predict", "--echoes", files["dir"] / "nosidecar.nii.gz", "--te", te, "--field-strength", "3", "--qsm", files["qsm"],
                                      "--model", model], "differs in its echo times from the model's")


def test_refuses_echo_times_in_seconds(capsys, tmp_path, files, model):
    te = ",".join(f"{(4.5 + 5 * i) / 1000:g}" for i in range(8))
    assert_refused(capsys, tmp_path, ["predict", "--echoes", files["echoes"], "--te", te, "--field-strength", "3", "--qsm", files["qsm"],
                                      "--model", model], "looks like seconds")


def test_refuses_a_sidecar_in_milliseconds_and_no_echo_times(capsys, tmp_path, files, model):
    from OEFPredictorLib import io

    echoes = _write(files, tmp_path, "ms.nii.gz", files["arrays"][0])
    io.write_json({"EchoTime": [4.5 + 5 * i for i in range(8)]}, tmp_path / "ms.json")
    assert_refused(capsys, tmp_path, ["predict", "--echoes", echoes, "--qsm", files["qsm"], "--model", model],
                   "looks like milliseconds")
    assert_refused(capsys, tmp_path, ["predict", "--echoes", files["dir"] / "nosidecar.nii.gz", "--qsm",
                                      files["qsm"], "--model", model], "give --te in milliseconds")


def test_refuses_an_empty_mask(capsys, tmp_path, files, model):
    mask = _write(files, tmp_path, "empty.nii.gz", np.zeros(files["shape"], np.uint8))
    assert_refused(capsys, tmp_path, ["predict", "--echoes", files["echoes"], "--qsm", files["qsm"], "--mask", mask,
                                      "--model", model], "mask is empty")


def test_refuses_a_2d_image(capsys, tmp_path, files, model):
    import SimpleITK as sitk

    path = tmp_path / "qsm2d.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(files["arrays"][1][5]), str(path))
    assert_refused(capsys, tmp_path, ["predict", "--echoes", files["echoes"], "--qsm", path, "--model", model],
                   "a 2D image")


def test_nan_voxels_warn_and_stay_local(capsys, tmp_path, files, model):
    from OEFPredictorLib import io

    echoes = files["arrays"][0].copy()
    mask = files["arrays"][2]
    where = tuple(np.argwhere(mask)[len(np.argwhere(mask)) // 2])
    echoes[where + (2,)] = np.nan
    path = _write(files, tmp_path, "nan.nrrd", echoes)  # NRRD: ITK's NIfTI reader turns NaN into 0
    out_dir = tmp_path / "nan_out"
    code, out, err = run_cli(capsys, "predict", "--echoes", path, "--te", TE_MS, "--field-strength", "3", "--qsm", files["qsm"], "--mask",
                             files["mask"], "--model", model, "--out", out_dir)
    assert code == 0, err
    assert "warning: 1 voxel(s) with NaN/Inf" in err
    for name in ("oef", "S0", "R2", "quality"):
        m = io.read_volume(out_dir / f"{name}.nii.gz")[0]
        assert np.all(np.isfinite(m)) and m[where] == 0
        assert np.count_nonzero(m[mask]) == mask.sum() - 1


def test_refuses_corrupt_and_non_keras_model_files(capsys, tmp_path, files, model):
    import shutil

    from OEFPredictorLib import models

    base = ["predict", "--echoes", files["echoes"], "--qsm", files["qsm"]]
    broken = tmp_path / "broken.keras"
    shutil.copy(model, broken)
    shutil.copy(models.card_path_for(model), models.card_path_for(broken))
    with open(broken, "r+b") as f:  # a flipped byte: the checksum catches it
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert_refused(capsys, tmp_path, base + ["--model", broken], "checksum mismatch")
    # not a Keras archive at all, with a card that matches its checksum
    fake = tmp_path / "fake.keras"
    fake.write_bytes(b"this is not a keras model\n" * 10)
    card = json.loads(models.card_path_for(model).read_text())
    card["sha256"] = models.sha256_of(fake)
    models.card_path_for(fake).write_text(json.dumps(card))
    assert_refused(capsys, tmp_path, base + ["--model", fake], "not a Keras model archive")
    assert_refused(capsys, tmp_path, base + ["--model", tmp_path / "missing.keras"], "no such model file")


def test_refuses_a_non_writable_output(capsys, tmp_path, files, model):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    code, _, err = run_cli(capsys, "predict", "--echoes", files["echoes"], "--qsm", files["qsm"], "--model", model,
                           "--out", blocker / "maps")
    assert code == 2 and "not a writable folder" in err and len(err.strip().splitlines()) == 1
    if os.geteuid() != 0:  # root may write anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        code, _, err = run_cli(capsys, "predict", "--echoes", files["echoes"], "--qsm", files["qsm"], "--model",
                               model, "--out", locked / "maps")
        assert code == 2 and "not a writable folder" in err
        assert list(locked.iterdir()) == []


def test_echoes_as_a_list_of_3d_files_give_the_same_maps(capsys, tmp_path, files, model):
    from OEFPredictorLib import io

    paths = [_write(files, tmp_path, f"e{i}.nii.gz", files["arrays"][0][..., i]) for i in range(8)]
    a = tmp_path / "a"
    code, _, err = run_cli(capsys, "predict", "--echoes", *paths, "--te", TE_MS, "--field-strength", "3", "--qsm", files["qsm"], "--mask",
                           files["mask"], "--model", model, "--out", a)
    assert code == 0, err
    b = tmp_path / "b"
    code, _, err = run_cli(capsys, "predict", "--echoes", files["echoes"], "--qsm", files["qsm"], "--mask",
                           files["mask"], "--model", model, "--out", b)
    assert code == 0, err
    np.testing.assert_array_equal(io.read_volume(a / "oef.nii.gz")[0], io.read_volume(b / "oef.nii.gz")[0])


def test_demo_without_the_bundled_model_fails_in_one_line(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("OEFPREDICTOR_RESOURCES", str(tmp_path))
    from OEFPredictorLib import resources

    monkeypatch.setattr(resources, "resource_dirs", lambda: [tmp_path])
    code, out, err = run_cli(capsys, "demo", "--out", tmp_path / "demo")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "bundled model of method" in err and "is not installed" in err
    assert not (tmp_path / "demo").exists()


@pytest.mark.slow
def test_demo_writes_maps_figure_and_roi_statistics(capsys, tmp_path, model):
    out_dir = tmp_path / "demo"
    code, out, err = run_cli(capsys, "demo", "--out", out_dir, "--model", model, "--voxel-size", "4", "--device", "cpu")
    assert code == 0, err
    assert "OEF RMSE" in out and "cortical_GM" in out
    assert (out_dir / "oef.nii.gz").exists() and (out_dir / "patient" / "P03").is_dir() and (out_dir / "demo_figure.png").stat().st_size > 10_000
    header = (out_dir / "roi_stats.csv").read_text().splitlines()[0]
    assert header.startswith("roi,map,unit") and "rmse" in header
    from OEFPredictorLib import roistats

    rows = roistats.read_csv(out_dir / "roi_stats.csv")
    pairs = [(r["roi"], r["map"]) for r in rows]
    assert len(pairs) == len(set(pairs)) and "lesion_misery_perfusion" not in {r["roi"] for r in rows}  # each ROI once
