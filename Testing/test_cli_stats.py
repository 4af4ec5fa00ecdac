"""`oefpredictor stats` on a tiny virtual patient: the library's numbers, the figure, bad inputs."""
from __future__ import annotations

import math
import os
import stat
from pathlib import Path

import numpy as np
import pytest

from OEFPredictorLib import io, phantom, roistats, simulate
from OEFPredictorLib.cli import main


@pytest.fixture(scope="module")
def patient(tiny_dataset, tmp_path_factory):
    """P01 (4 mm, with lesions) and a 'prediction': its truth OEF perturbed (bias, noise, NaNs)."""
    folder = tiny_dataset / "P01"
    files = simulate.patient_files(folder)
    data = simulate.load_patient(folder)
    rng = np.random.default_rng(5)
    pred = data.truth["OEF"] * 0.9 + 5.0 + rng.normal(0.0, 2.0, data.truth["OEF"].shape)
    pred[data.mask & (rng.random(pred.shape) < 0.01)] = np.nan
    r2 = data.truth["R2"] + rng.normal(0.0, 1.0, pred.shape)
    out = tmp_path_factory.mktemp("prediction")
    io.write_volume(pred.astype(np.float32), data.geometry, out / "oef.nii.gz")
    io.write_volume(r2.astype(np.float32), data.geometry, out / "R2.nii.gz")
    return {"files": files, "data": data, "pred_dir": out}


def run_cli(args, capsys):
    code = main(["stats", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_rows_equal(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        for key in roistats.COLUMNS:
            if isinstance(w[key], float) and math.isnan(w[key]):
                assert math.isnan(g[key]), (w["roi"], w["map"], key)
            elif isinstance(w[key], float):
                # The CLI reads float32 images as float64; the library gets the same values.
                assert g[key] == pytest.approx(w[key], rel=1e-9, abs=1e-12), (w["roi"], w["map"], key)
            else:
                assert g[key] == w[key], (w["roi"], w["map"], key)


def test_cli_equals_library(patient, tmp_path, capsys):
    files, data = patient["files"], patient["data"]
    out_csv, out_png = tmp_path / "res" / "stats.csv", tmp_path / "res" / "stats.png"
    code, out, err = run_cli(["--map", patient["pred_dir"] / "oef.nii.gz",
                              "--labels", files["labels"], files["lesions"],
                              "--truth", files["truth_OEF"], "--mask", files["mask"],
                              "--out", out_csv, "--figure", out_png], capsys)
    assert code == 0, err
    got = roistats.read_csv(out_csv)

    # The library on arrays loaded independently of the CLI.
    pred, geometry = io.read_volume(patient["pred_dir"] / "oef.nii.gz")
    rois = roistats.rois_from_labels(data.labels, phantom.LABELS)
    rois.update(roistats.rois_from_labels(data.lesion_map, phantom.LESION_MAP_LABELS))
    want = roistats.roi_statistics({"OEF": pred}, rois, roistats.voxel_volume_ml(geometry.spacing),
                                   mask=data.mask, reference={"OEF": data.truth["OEF"]},
                                   contrasts=roistats.contralateral_pairs(rois))
    assert_rows_equal(got, want)

    # Names from the dseg.tsv files; the lesion got its contrast against its mirror.
    names = [r["roi"] for r in got]
    assert "WM" in names and "label_2" not in names
    lesions = [r for r in got if r["contrast_reference"]]
    assert lesions and all(r["contrast_reference"] == "contralateral_" + r["roi"] for r in lesions)
    assert all(np.isfinite(r["cnr"]) and np.isfinite(r["reference_cnr"]) for r in lesions)
    # One number straight from numpy: the WM mean of the prediction.
    wm = data.mask & (data.labels == 2) & np.isfinite(pred)
    assert next(r for r in got if r["roi"] == "WM")["mean"] == pytest.approx(
        pred[wm].astype(np.float64).mean(), rel=1e-9)
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in out_csv.parent.iterdir()) == ["stats.csv", "stats.png"]
    umask = os.umask(0)
    os.umask(umask)
    for path in (out_csv, out_png):  # ordinary permissions, not a temporary file's 0600
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    assert "| WM | OEF |" in out


def test_several_maps_matched_to_truth_by_name(patient, tmp_path, capsys):
    files = patient["files"]
    code, _, err = run_cli(["--map", patient["pred_dir"] / "oef.nii.gz", patient["pred_dir"] / "R2.nii.gz",
                            "--labels", files["labels"],
                            "--truth", files["truth_R2"], files["truth_OEF"],
                            "--out", tmp_path / "s.csv"], capsys)
    assert code == 0, err
    rows = roistats.read_csv(tmp_path / "s.csv")
    assert [r["map"] for r in rows[:2]] == ["OEF", "R2"]
    r2 = next(r for r in rows if r["roi"] == "WM" and r["map"] == "R2")
    assert r2["unit"] == "Hz" and r2["n_paired"] > 0 and 0.5 < r2["rmse"] < 1.5  # noise SD 1 Hz


def test_missing_file_is_one_line_exit_2_and_no_output(patient, tmp_path, capsys):
    files = patient["files"]
    code, _, err = run_cli(["--map", tmp_path / "nope.nii.gz", "--labels", files["labels"],
                            "--out", tmp_path / "out" / "s.csv"], capsys)
    assert code == 2
    assert err.count("\n") == 1 and "nope.nii.gz: no such file" in err
    assert list(tmp_path.iterdir()) == []


def test_geometry_mismatch_names_both_geometries(patient, tmp_path, capsys):
    files, data = patient["files"], patient["data"]
    g = data.geometry
    shifted = io.Geometry(g.spacing, tuple(o + 10.0 for o in g.origin), g.direction)
    io.write_volume(data.truth["OEF"], shifted, tmp_path / "truth_shifted.nii.gz")
    out = tmp_path / "out"
    code, _, err = run_cli(["--map", patient["pred_dir"] / "oef.nii.gz", "--labels", files["labels"],
                            "--truth", tmp_path / "truth_shifted.nii.gz",
                            "--out", out / "s.csv", "--figure", out / "s.png"], capsys)
    assert code == 2 and err.count("\n") == 1
    assert "truth_shifted.nii.gz (truth) has size" in err and "oef.nii.gz has size" in err
    assert err.count("origin (") == 2
    assert not out.exists()

    smaller = tmp_path / "labels_small.nii.gz"
    io.write_volume(data.labels[1:], g, smaller)
    code, _, err = run_cli(["--map", patient["pred_dir"] / "oef.nii.gz", "--labels", smaller,
                            "--out", out / "s.csv"], capsys)
    assert code == 2 and "labels_small.nii.gz (labels) has size" in err and not out.exists()


def test_figure_needs_truth(patient, tmp_path, capsys):
    code, _, err = run_cli(["--map", patient["pred_dir"] / "oef.nii.gz",
                            "--labels", patient["files"]["labels"], "--figure", tmp_path / "f.png"], capsys)
    assert code == 2 and "--truth" in err and list(tmp_path.iterdir()) == []


def test_failure_while_drawing_leaves_no_files(patient, tmp_path, capsys, monkeypatch):
    from OEFPredictorLib import comparison
    from OEFPredictorLib.errors import InputError

    def broken(*args, **kwargs):
        raise InputError("drawing failed")

    monkeypatch.setattr(comparison, "comparison_figure", broken)
    files = patient["files"]
    code, _, err = run_cli(["--map", patient["pred_dir"] / "oef.nii.gz", "--labels", files["labels"],
                            "--truth", files["truth_OEF"], "--out", tmp_path / "s.csv",
                            "--figure", tmp_path / "s.png"], capsys)
    assert code == 2 and "drawing failed" in err
    assert list(tmp_path.iterdir()) == []


def test_truth_of_another_map_is_refused(patient, tmp_path, capsys):
    files = patient["files"]
    code, _, err = run_cli(["--map", patient["pred_dir"] / "R2.nii.gz", "--labels", files["labels"],
                            "--truth", files["truth_OEF"], "--out", tmp_path / "s.csv"], capsys)
    assert code == 2 and "['OEF'] match no --map" in err and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("bad", ["999", "-1", "-40"])
def test_a_slice_out_of_range_is_one_line_before_any_output(patient, tmp_path, capsys, bad):
    depth = patient["data"].mask.shape[0]
    code, out, err = run_cli(["--map", patient["pred_dir"] / "oef.nii.gz", "--labels", patient["files"]["labels"],
                              "--truth", patient["files"]["truth_OEF"], "--out", tmp_path / "t.csv",
                              "--figure", tmp_path / "f.png", "--slice", bad], capsys)
    assert code == 2, err
    assert err.count("\n") == 1 and f"--slice {bad} is out of range" in err and f"0 to {depth - 1}" in err
    assert out == "" and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("bad", ["999", "-1"])
def test_montage_slice_out_of_range_is_one_line(tiny_dataset, tmp_path, capsys, bad):
    code = main(["montage", str(tiny_dataset / "P01"), "--out", str(tmp_path / "m.png"), "--slice", bad])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "out of range" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("given, written", [("folder", "folder/P01_montage.png"), ("picture", "picture.png"),
                                            ("new_folder/", "new_folder/P01_montage.png")])
def test_montage_names_the_file_it_wrote(tiny_dataset, tmp_path, capsys, given, written):
    (tmp_path / "folder").mkdir()
    code = main(["montage", str(tiny_dataset / "P01"), "--out", str(tmp_path) + "/" + given])
    out = capsys.readouterr().out
    assert code == 0
    assert out.strip() == f"Wrote {tmp_path / written}"
    assert (tmp_path / written).is_file()
    assert sorted(p.name for p in tmp_path.rglob("*.png")) == [Path(written).name]


def test_a_slice_out_of_range_without_a_figure_is_refused_too(patient, capsys):
    code, out, err = run_cli(["--map", patient["pred_dir"] / "oef.nii.gz", "--labels", patient["files"]["labels"],
                              "--slice", "-2"], capsys)
    assert code == 2 and out == "" and err.count("\n") == 1 and "--slice -2 is out of range" in err
