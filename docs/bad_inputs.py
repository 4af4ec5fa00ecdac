"""Build docs/bad_inputs.md: every bad-input case of issues 12 and 20 and what the tool does with it.

Each case is run for real on a small simulated patient (6 mm, SNR 100) with the bundled LSTM, and
the table shows what happened: the exit code and the line the tool printed. The test named in each
row checks the same case (Testing/test_reliability.py, test_bad_inputs_table_is_current checks
that this table lists every case below). Rebuild (about 3 minutes on 2 cores), from the repository
root:

    .venv/bin/python docs/bad_inputs.py
"""
from __future__ import annotations

import contextlib
import dataclasses
import io as _io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "OEFPredictor"))

import numpy as np  # noqa: E402

TESTS = "Testing/test_reliability.py"


@dataclasses.dataclass
class Case:
    section: str
    given: str  # the bad input
    test: str  # the test that checks it: "file::name"
    run: Callable | None = None  # ctx -> (exit code, what was printed); None: not run here


class Ctx:
    """A scratch folder with a copy of the patient per case."""

    def __init__(self, root: Path, patient: Path):
        self.root, self.patient = root, patient
        self.n = 0

    def fresh(self) -> Path:
        self.n += 1
        d = self.root / f"case{self.n:02d}"
        shutil.copytree(self.patient, d / "P03")
        return d

    @staticmethod
    def p(d: Path, name: str) -> Path:
        return d / "P03" / f"P03_{name}"


def cli(*argv) -> tuple[int, str]:
    from OEFPredictorLib.cli import main

    err, out = _io.StringIO(), _io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        code = main([str(a) for a in argv])
    return code, err.getvalue() + "\n" + out.getvalue()


class Observed(str):
    """A case's own summary of what happened: shown as it is (not filtered by `said` again)."""


def said(text: str, *keys: str) -> str:
    """The tool's lines that matter (errors, warnings, or the lines holding `keys`)."""
    lines = [l.strip() for l in re.split(r"[\r\n]", text) if l.strip() and "%|" not in l]
    picked = [l for l in lines if re.match(r"oefpredictor \w+: (error|warning|terminated|interrupted)", l)
              or any(k in l for k in keys)]
    return " / ".join(picked)


def predict(d: Path, *extra, echoes=None, qsm=None):
    return cli("predict", "--echoes", echoes or Ctx.p(d, "MEGRE.nii.gz"), "--qsm", qsm or Ctx.p(d, "Chimap.nii.gz"),
               "--device", "cpu", *extra)


def truncate(path: Path, fraction: float = 0.6) -> None:
    with open(path, "r+b") as f:
        f.truncate(int(path.stat().st_size * fraction))


# --- the cases -------------------------------------------------------------------------------------
def c_patient_folder(ctx):
    d = ctx.fresh()
    before = sorted(os.listdir(d / "P03"))
    code, text = predict(d, "--out", d / "P03", "--overwrite")
    kept = all((d / "P03" / n).exists() for n in before)
    return code, f"maps added to the folder; all {len(before)} patient files kept: {kept}"


def c_demo_folder(ctx):
    from OEFPredictorLib import io

    d = ctx.fresh()
    demo = d / "demo_output"
    with io.atomic_directory(demo, command="demo") as tmp:
        shutil.copytree(d / "P03", tmp / "patient" / "P03")
    before = [p for p in demo.rglob("*") if p.is_file()]
    p = demo / "patient" / "P03"
    code, text = cli("predict", "--echoes", p / "P03_MEGRE.nii.gz", "--qsm", p / "P03_Chimap.nii.gz", "--device",
                     "cpu", "--out", demo, "--overwrite")
    return code, f"maps replaced; patient/ kept: {all(f.exists() for f in before)}"


def c_mixed_folder(ctx):
    d = ctx.fresh()
    out = d / "maps"
    cbf = d / "cbf.nii.gz"
    shutil.copy(Ctx.p(d, "desc-truth_R2map.nii.gz"), cbf)  # any positive map will do as a CBF here
    predict(d, "--cbf", cbf, "--out", out)
    shutil.copy(Ctx.p(d, "Chimap.nii.gz"), out / "my_qsm.nii.gz")
    (out / "notes.txt").write_text("mine")
    code, text = predict(d, "--qsm", out / "my_qsm.nii.gz", "--out", out, "--overwrite")
    names = set(os.listdir(out))
    return code, (f"input my_qsm.nii.gz and notes.txt kept: {{'my_qsm.nii.gz', 'notes.txt'}} <= names is "
                  f"{ {'my_qsm.nii.gz', 'notes.txt'} <= names}; the earlier run's cmro2.nii.gz removed: "
                  f"{'cmro2.nii.gz' not in names}")


def c_input_named_like_output(ctx):
    d = ctx.fresh()
    out = d / "maps"
    predict(d, "--out", out)
    return predict(d, "--mask", out / "mask.nii.gz", "--out", out, "--overwrite")


def _truncated_copy(ctx, name, dtype=None):
    from OEFPredictorLib import io

    d = ctx.fresh()
    src = Ctx.p(d, name)
    if dtype is not None:
        array, geometry = io.read_volume(src)
        io.write_volume(array.astype(dtype), geometry, src)
    truncate(src)
    return d


def c_trunc_int16_echoes(ctx):
    d = _truncated_copy(ctx, "MEGRE.nii.gz", np.int16)
    return predict(d, "--out", d / "out")


def c_trunc_uint8_mask(ctx):
    d = _truncated_copy(ctx, "desc-brain_mask.nii.gz", np.uint8)
    return predict(d, "--mask", Ctx.p(d, "desc-brain_mask.nii.gz"), "--out", d / "out")


def c_trunc_float_predict(ctx):
    d = _truncated_copy(ctx, "Chimap.nii.gz")
    return predict(d, "--out", d / "out")


def c_trunc_float_stats(ctx):
    d = _truncated_copy(ctx, "desc-truth_OEFmap.nii.gz")
    return cli("stats", "--map", Ctx.p(d, "desc-truth_OEFmap.nii.gz"), "--labels", Ctx.p(d, "dseg.nii.gz"))


def _converted(ctx, suffix):
    from OEFPredictorLib import io

    d = ctx.fresh()
    array, geometry = io.read_volume(Ctx.p(d, "Chimap.nii.gz"))
    path = d / f"qsm{suffix}"
    io.write_volume(array, geometry, path)
    truncate(path)
    return d, path


def c_trunc_mha(ctx):
    d, path = _converted(ctx, ".mha")
    return predict(d, "--qsm", path, "--out", d / "out")


def c_trunc_nrrd(ctx):
    d, path = _converted(ctx, ".nrrd")
    return predict(d, "--qsm", path, "--out", d / "out")


def _dicom(folder: Path, volume, echo_times_ms=None):
    sys.path.insert(0, str(REPO / "Testing"))
    from test_reliability import _write_dicom_series

    _write_dicom_series(folder, volume, echo_times_ms)


def c_trunc_dicom(ctx):
    d = ctx.fresh()
    _dicom(d / "dcm", np.random.default_rng(1).integers(100, 1000, (6, 16, 20)), [4.5 + 5 * i for i in range(8)])
    truncate(d / "dcm" / "e1_003.dcm", 0.8)
    return predict(d, "--echoes", d / "dcm", "--out", d / "out")


def _edited(ctx, qsm_fn=None, echo_fn=None):
    from OEFPredictorLib import io

    d = ctx.fresh()
    if qsm_fn:
        q, g = io.read_volume(Ctx.p(d, "Chimap.nii.gz"))
        io.write_volume(qsm_fn(q), g, Ctx.p(d, "Chimap.nii.gz"))
    if echo_fn:
        e, g = io.read_volume(Ctx.p(d, "MEGRE.nii.gz"))
        io.write_volume(echo_fn(e), g, Ctx.p(d, "MEGRE.nii.gz"))
    return predict(d, "--out", d / "out")


def c_qsm_ppb(ctx):
    return _edited(ctx, qsm_fn=lambda q: q * 1000)


def c_echoes_reversed(ctx):
    return _edited(ctx, echo_fn=lambda e: e[..., ::-1])


def c_echoes_shuffled(ctx):
    return _edited(ctx, echo_fn=lambda e: e[..., [0, 1, 5, 2, 6, 3, 7, 4]])


def c_echoes_clipped(ctx):
    return _edited(ctx, echo_fn=lambda e: np.minimum(e * (65535.0 / np.percentile(e[e > 0], 80)), 65535.0)
                   .astype(np.uint16))


def c_qsm_zero(ctx):
    return _edited(ctx, qsm_fn=np.zeros_like)


def c_qsm_constant(ctx):
    return _edited(ctx, qsm_fn=lambda q: np.full_like(q, 0.05))


def c_te_vs_sidecar(ctx):
    d = ctx.fresh()
    side = Ctx.p(d, "MEGRE.json")
    data = json.loads(side.read_text())
    data["EchoTime"] = [round(t * 1.1, 6) for t in data["EchoTime"]]  # the sidecar is wrong, --te is right
    side.write_text(json.dumps(data))
    return predict(d, "--te", "4.5,9.5,14.5,19.5,24.5,29.5,34.5,39.5", "--out", d / "out")


def c_bad_fit(ctx):
    def noisy(e):  # Rician noise for SNR 3
        rng = np.random.default_rng(0)
        sigma = e[..., 0][e[..., 0] > 0.2 * np.percentile(e[..., 0], 99)].mean() / 3.0
        return np.hypot(e + sigma * rng.standard_normal(e.shape), sigma * rng.standard_normal(e.shape))
    return _edited(ctx, echo_fn=noisy)


def c_unpredicted(ctx):
    from OEFPredictorLib import io, roistats

    d = ctx.fresh()
    q, g = io.read_volume(Ctx.p(d, "Chimap.nii.gz"))
    brain = io.read_volume(Ctx.p(d, "desc-brain_mask.nii.gz"))[0] > 0
    holes = np.argwhere(brain)[::97][:20]
    q[tuple(holes.T)] = np.nan
    io.write_volume(q, g, d / "qsm_nan.nrrd")
    code, text = predict(d, "--qsm", d / "qsm_nan.nrrd", "--mask", Ctx.p(d, "desc-brain_mask.nii.gz"),
                         "--out", d / "out")
    io.write_volume(brain.astype(np.uint8), g, d / "brain.nii.gz")
    cli("stats", "--map", d / "out" / "oef.nii.gz", "--labels", d / "brain.nii.gz", "--out", d / "s.csv")
    row = roistats.read_csv(d / "s.csv")[0]
    return code, (f"{said(text)} / maps 0 there, mask.nii.gz written: {(d / 'out' / 'mask.nii.gz').exists()}; "
                  f"stats: n_unpredicted {row['n_unpredicted']}, mean over predicted voxels only")


def _subprocess(argv, **kw):
    env = dict(os.environ, PYTHONPATH=str(REPO / "OEFPredictor"))
    return subprocess.Popen([sys.executable, "-m", "OEFPredictorLib.cli", *map(str, argv)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, encoding="utf-8", errors="replace", **kw)


def c_disk_full(ctx):
    import resource

    d = ctx.fresh()
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (16_000, 16_000))  # noqa: E731
    proc = _subprocess(["predict", "--echoes", Ctx.p(d, "MEGRE.nii.gz"), "--qsm", Ctx.p(d, "Chimap.nii.gz"),
                        "--device", "cpu", "--out", d / "out"], preexec_fn=limit)
    _, err = proc.communicate(timeout=600)
    return proc.returncode, said(err) + f" / output folder left: {(d / 'out').exists()}"


def _card_case(ctx, change):
    from OEFPredictorLib import models, resources

    d = ctx.fresh()
    src = resources.bundled_model_path("lstm")
    dst = d / "model.keras"
    shutil.copy(src, dst)
    card = json.loads(models.card_path_for(src).read_text())
    change(card)
    models.card_path_for(dst).write_text(json.dumps(card))
    return predict(d, "--model", dst, "--out", d / "out")


def c_card_window(ctx):
    return _card_case(ctx, lambda c: c.pop("window"))


def c_card_scaling(ctx):
    return _card_case(ctx, lambda c: c["output_scaling"].update(std=[1.0, 2.0]))


def c_evaluate_out_file(ctx):
    d = ctx.fresh()
    (d / "report.md").write_text("mine")
    t = time.perf_counter()
    code, text = cli("evaluate", "--data", d, "--patients", "P03", "--methods", "tissue_mean", "--out",
                     d / "report.md")
    return code, f"{said(text)} (after {time.perf_counter() - t:.1f} s, before the evaluation)"


def c_signal(sig):
    def run(ctx):
        d = ctx.fresh()
        proc = _subprocess(["simulate", "--out", d / "sim", "--patients", "2", "--voxel-size", "6"],
                           preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        while proc.poll() is None and not ((d / "sim").is_dir() and any(".partial" in p.name
                                                                        for p in (d / "sim").iterdir())):
            time.sleep(0.005)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
        left = [p.name for p in (d / "sim").rglob("*") if ".partial" in p.name]
        return proc.returncode, said(err) + f" / .partial folders left: {len(left)}"
    return run


def c_direction(ctx):
    from OEFPredictorLib import io

    d = ctx.fresh()
    q, g = io.read_volume(Ctx.p(d, "Chimap.nii.gz"))
    m = np.array(g.direction).reshape(3, 3)
    m[1] *= -1
    io.write_volume(q, io.Geometry(g.spacing, g.origin, tuple(m.ravel())), d / "qsm.nii.gz")
    return predict(d, "--qsm", d / "qsm.nii.gz", "--out", d / "out")


def c_field_strength(ctx):
    d = ctx.fresh()
    side = Ctx.p(d, "MEGRE.json")
    data = json.loads(side.read_text())
    data["MagneticFieldStrength"] = 1.5
    side.write_text(json.dumps(data))
    return predict(d, "--out", d / "out")


def _field_map(d: Path, shape_cut: int = 0, hz_per_voxel: float = 2.0) -> Path:
    """A field map beside the patient's files: a linear field along z, 0 outside the brain."""
    from OEFPredictorLib import io

    mask, geometry = io.read_volume(Ctx.p(d, "desc-brain_mask.nii.gz"))
    field = (hz_per_voxel * np.indices(mask.shape)[0] * (mask > 0)).astype(np.float32)
    path = d / "fieldmap.nii.gz"
    io.write_volume(field[:, : field.shape[1] - shape_cut] if shape_cut else field, geometry, path)
    return path


def c_field_map_no_unit(ctx):
    d = ctx.fresh()
    return predict(d, "--mask", Ctx.p(d, "desc-brain_mask.nii.gz"), "--field-map", _field_map(d), "--out", d / "out")


def c_field_map_other_grid(ctx):
    d = ctx.fresh()
    return predict(d, "--mask", Ctx.p(d, "desc-brain_mask.nii.gz"), "--field-map", _field_map(d, shape_cut=2),
                   "--field-map-units", "Hz", "--out", d / "out")


def c_field_map_steep(ctx):
    d = ctx.fresh()
    return predict(d, "--mask", Ctx.p(d, "desc-brain_mask.nii.gz"), "--field-map", _field_map(d, hz_per_voxel=30.0),
                   "--field-map-units", "Hz", "--out", d / "out")


def c_dicom_no_te(ctx):
    d = ctx.fresh()
    _dicom(d / "dcm", np.random.default_rng(2).integers(100, 1000, (5, 12, 14)))
    return predict(d, "--echoes", d / "dcm", "--te", "4.5,9.5,14.5,19.5,24.5,29.5,34.5,39.5", "--field-strength", "3",
                   "--out", d / "out")


def c_non_zip(ctx):
    from OEFPredictorLib import models, resources

    d = ctx.fresh()
    fake = d / "fake.keras"
    fake.write_bytes(b"not a zip archive\n" * 20)
    card = json.loads(models.card_path_for(resources.bundled_model_path("lstm")).read_text())
    card["sha256"] = models.sha256_of(fake)
    models.card_path_for(fake).write_text(json.dumps(card))
    return predict(d, "--model", fake, "--out", d / "out")


def c_lambda(ctx):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    from OEFPredictorLib import models, physics

    d = ctx.fresh()
    inputs = keras.Input((5, 9))
    outputs = keras.layers.Lambda(lambda x: x[:, 0, :5] * 2.0)(inputs)
    card = models.make_card({"architecture": "lstm"}, physics.Protocol.default(),
                            {"mean": [0.0] * 5, "std": [1.0] * 5}, 5, "centre")
    path = models.save_bundle(keras.Model(inputs, outputs), card, d / "lambda.keras")
    return predict(d, "--model", path, "--out", d / "out")


def c_nan_message(ctx):
    d = ctx.fresh()
    side = Ctx.p(d, "MEGRE.json")
    side.write_text('{"EchoTime": [0.0045, NaN, 0.0145, 0.0195, 0.0245, 0.0295, 0.0345, 0.0395]}')
    return predict(d, "--out", d / "out")


def c_warnings_once(ctx):
    from OEFPredictorLib import io

    d = ctx.fresh()
    q, g = io.read_volume(Ctx.p(d, "Chimap.nii.gz"))
    brain = io.read_volume(Ctx.p(d, "desc-brain_mask.nii.gz"))[0] > 0
    q[tuple(np.argwhere(brain)[0])] = np.nan
    io.write_volume(q, g, d / "qsm.nrrd")
    code, text = predict(d, "--qsm", d / "qsm.nrrd", "--mask", Ctx.p(d, "desc-brain_mask.nii.gz"), "--out", d / "out")
    return code, f"{said(text)} (printed {text.count('1 voxel(s) with NaN/Inf')} time)"


# --- issue 20: inputs as scanners and pipelines write them ---------------------------------------
FS = "Testing/test_field_strength_and_masks.py::"
BI = "Testing/test_batch_inputs.py::"


def _without_field(ctx):
    d = ctx.fresh()
    side = Ctx.p(d, "MEGRE.json")
    data = json.loads(side.read_text())
    data.pop("MagneticFieldStrength")
    side.write_text(json.dumps(data))
    return d


def c_no_field(ctx):
    d = _without_field(ctx)
    return predict(d, "--out", d / "out")


def c_field_given(ctx):
    d = _without_field(ctx)
    code, text = predict(d, "--field-strength", "7", "--method", "nlls", "--out", d / "out")
    used = json.loads((d / "out" / "prediction.json").read_text())["protocol"]["field_strength_T"] if code == 0 else None
    return code, f"maps at the field given; prediction.json field_strength_T: {used}"


def c_dicom_no_field(ctx):
    d = ctx.fresh()
    _dicom(d / "dcm", np.random.default_rng(2).integers(100, 1000, (5, 12, 14)), [4.5, 9.5])
    return predict(d, "--echoes", d / "dcm", "--out", d / "out")


def c_help(ctx):
    try:
        code, text = cli("predict", "--help")
    except SystemExit as exc:
        code, text = exc.code, ""
    return code, "the help is printed (a literal % in the method list crashed it)"


def c_stats_slice(ctx):
    d = ctx.fresh()
    return cli("stats", "--map", Ctx.p(d, "desc-truth_OEFmap.nii.gz"), "--labels", Ctx.p(d, "dseg.nii.gz"),
               "--truth", Ctx.p(d, "desc-truth_OEFmap.nii.gz"), "--figure", d / "f.png", "--slice", "999")


def c_montage_slice(ctx):
    d = ctx.fresh()
    return cli("montage", d / "P03", "--out", d / "m.png", "--slice", "-1")


def c_montage_dir(ctx):
    d = ctx.fresh()
    (d / "figures").mkdir()
    code, text = cli("montage", d / "P03", "--out", d / "figures")
    return code, text.strip()


def c_mask_skull(ctx):
    from scipy import ndimage

    from OEFPredictorLib import io

    d = ctx.fresh()
    m, g = io.read_volume(Ctx.p(d, "desc-brain_mask.nii.gz"))
    io.write_volume(ndimage.binary_dilation(m > 0, iterations=1).astype(np.uint8), g, d / "grown_mask.nii.gz")
    return predict(d, "--mask", d / "grown_mask.nii.gz", "--method", "nlls", "--out", d / "out")


def c_no_mask(ctx):
    d = ctx.fresh()
    code, text = predict(d, "--method", "nlls", "--out", d / "out")
    return code, Observed(said(text, "note:"))


def _raw_bids(ctx):
    """The patient as a BIDS raw data set without derivatives (no masks), as converters write it:
    sub-P03 with two runs, sub-P04 with EchoTime in ms, sub-P05 without MagneticFieldStrength."""
    from OEFPredictorLib import bids

    ctx.n += 1
    d = ctx.root / f"case{ctx.n:02d}"
    sim = d / "sim"
    for pid in ("P03", "P04", "P05"):
        shutil.copytree(ctx.patient, sim / pid)
        for f in list((sim / pid).iterdir()):
            f.rename(f.with_name(f.name.replace("P03_", f"{pid}_")))
    (sim / "dataset_description.json").write_text(json.dumps({"Name": "bad inputs"}))
    bids.write_simulated_bids(sim, d / "raw")
    shutil.rmtree(d / "raw" / "derivatives")
    anat = d / "raw" / "sub-P03" / "anat"
    for f in sorted(anat.glob("sub-P03_echo-*")):
        shutil.copy(f, f.with_name(f.name.replace("sub-P03_", "sub-P03_run-2_")))
        f.rename(f.with_name(f.name.replace("sub-P03_", "sub-P03_run-1_")))
    for pid, change in (("P04", lambda m: m.update(EchoTime=m["EchoTime"] * 1000)),
                        ("P05", lambda m: m.pop("MagneticFieldStrength"))):
        for side in (d / "raw" / f"sub-{pid}" / "anat").glob("*_MEGRE.json"):
            meta = json.loads(side.read_text())
            change(meta)
            side.write_text(json.dumps(meta))
    return d


def c_raw_bids(ctx):
    d = _raw_bids(ctx)
    code, text = cli("batch", d / "raw", d / "out", "--method", "nlls", "--workers", "1")
    log = (d / "out" / "logs" / "batch.log").read_text() if (d / "out" / "logs").exists() else ""
    units = [line.split("\t")[1] + ": " + line.split("\t")[2] for line in log.splitlines()]
    return code, Observed(said(text, "failed:", "subject(s)") + " / batch.log: " + "; ".join(units))


def c_batch_lock(ctx):
    from OEFPredictorLib import cohort, io

    d = ctx.fresh()
    out = d / "out"
    out.mkdir()
    (out / io.OUTPUT_MARKER).write_text("x")
    (d / "raw").mkdir()
    (d / "raw" / "dataset_description.json").write_text(json.dumps({"Name": "x", "BIDSVersion": "1.10.0"}))
    with cohort.output_lock(out):
        return cli("batch", d / "raw", out, "--method", "nlls")


T = TESTS + "::"
CASES = [
    Case("Data loss", "`predict --out sim/P03 --overwrite` with the inputs in sim/P03 (a `simulate` folder)",
         T + "test_predict_into_the_patient_folder_keeps_the_patient", c_patient_folder),
    Case("Data loss", "`predict --out demo_output --overwrite` with the inputs in demo_output/patient/",
         T + "test_predict_into_a_demo_folder_keeps_the_demo_patient", c_demo_folder),
    Case("Data loss", "`--overwrite` of an earlier output folder that now also holds an input and the user's files",
         T + "test_overwrite_keeps_inputs_and_foreign_files_and_drops_own_stale_outputs", c_mixed_folder),
    Case("Data loss", "an input with the name of an output in `--out` (`--mask out/mask.nii.gz --out out --overwrite`)",
         T + "test_an_input_named_like_an_output_is_refused_before_any_work", c_input_named_like_output),
    Case("Data loss", "`simulate --overwrite` over a patient folder the user added files to",
         T + "test_simulate_overwrite_keeps_files_the_user_added"),
    Case("Truncated files", "truncated int16 NIfTI echoes (.nii.gz)",
         T + "test_truncated_inputs_give_one_line_errors_in_predict_and_stats", c_trunc_int16_echoes),
    Case("Truncated files", "truncated uint8 NIfTI mask",
         T + "test_truncated_inputs_give_one_line_errors_in_predict_and_stats", c_trunc_uint8_mask),
    Case("Truncated files", "truncated float NIfTI in `predict` (QSM)",
         T + "test_truncated_inputs_give_one_line_errors_in_predict_and_stats", c_trunc_float_predict),
    Case("Truncated files", "truncated float NIfTI in `stats`",
         T + "test_truncated_inputs_give_one_line_errors_in_predict_and_stats", c_trunc_float_stats),
    Case("Truncated files", "truncated MetaImage (.mha; ITK said \"No such file or directory\")",
         T + "test_a_truncated_image_is_refused_in_every_format", c_trunc_mha),
    Case("Truncated files", "truncated NRRD", T + "test_a_truncated_image_is_refused_in_every_format", c_trunc_nrrd),
    Case("Truncated files", "a truncated file in a DICOM echo series (GDCM skipped it: a slice missing)",
         T + "test_a_truncated_dicom_file_is_refused_not_skipped", c_trunc_dicom),
    Case("Plausibility", "QSM in ppb instead of ppm", T + "test_the_plausibility_gate_refuses", c_qsm_ppb),
    Case("Plausibility", "echoes in reverse order", T + "test_the_plausibility_gate_refuses", c_echoes_reversed),
    Case("Plausibility", "echoes shuffled", T + "test_the_plausibility_gate_refuses", c_echoes_shuffled),
    Case("Plausibility", "echoes clipped when stored (floats cast to 16-bit integers, scaled too far)",
         T + "test_the_plausibility_gate_refuses", c_echoes_clipped),
    Case("Plausibility", "all-zero QSM", T + "test_the_plausibility_gate_refuses", c_qsm_zero),
    Case("Plausibility", "constant QSM", T + "test_the_plausibility_gate_refuses", c_qsm_constant),
    Case("Plausibility", "`--te` that contradicts the BIDS sidecar",
         T + "test_te_contradicting_the_sidecar_says_which_was_used", c_te_vs_sidecar),
    Case("Plausibility", "data the model cannot explain (median quality far above 1/SNR): echoes at SNR 3",
         T + "test_a_bad_fit_is_named_in_a_warning", c_bad_fit),
    Case("Plausibility", "valid data: every simulated patient (17), without noise and at SNR 20, 50, 100, 200",
         T + "test_the_plausibility_gate_passes_every_simulated_patient_at_every_snr"),
    Case("Unpredicted voxels", "voxels left out of the prediction (NaN inputs, outside the mask), read by `stats`",
         T + "test_stats_leaves_out_unpredicted_voxels_by_default", c_unpredicted),
    Case("Unpredicted voxels", "the same, in the Slicer module's ROI table",
         T + "test_slicer_roi_table_leaves_out_unpredicted_voxels"),
    Case("Tracebacks", "disk full while writing the maps (a file size limit stands in)",
         T + "test_predict_on_a_full_disk_fails_in_one_line_and_keeps_nothing", c_disk_full),
    Case("Tracebacks", "disk full: SimpleITK's WriteImage to a full device (/dev/full)",
         T + "test_a_write_to_a_full_disk_raises"),
    Case("Tracebacks", "model card without `window`", T + "test_a_malformed_model_card_is_one_line", c_card_window),
    Case("Tracebacks", "model card with a malformed `output_scaling`", T + "test_a_malformed_model_card_is_one_line",
         c_card_scaling),
    Case("Tracebacks", "`evaluate --out` that is a file",
         T + "test_evaluate_out_that_is_a_file_is_refused_before_the_run", c_evaluate_out_file),
    Case("Tracebacks", "an output folder that is a mount point (needs root: run by the test where it may mount)",
         T + "test_an_output_folder_that_is_a_mount_point"),
    Case("Tracebacks", "SIGTERM during a run", T + "test_a_signal_during_a_run_leaves_no_partial_folder",
         c_signal(signal.SIGTERM)),
    Case("Tracebacks", "SIGINT (Ctrl-C) during a run", T + "test_a_signal_during_a_run_leaves_no_partial_folder",
         c_signal(signal.SIGINT)),
    Case("Tracebacks", "disk full while `stats --out` writes its CSV (a file size limit stands in)",
         T + "test_stats_csv_on_a_full_disk_fails_in_one_line"),
    Case("Messages", "QSM on a grid of another direction (same size, spacing, origin)",
         T + "test_a_direction_mismatch_shows_the_directions", c_direction),
    Case("Messages", "field strength other than the model's (sidecar 1.5 T)",
         T + "test_a_field_strength_mismatch_is_called_so", c_field_strength),
    Case("Messages", "DICOM echo folder without EchoTime tags",
         T + "test_a_dicom_folder_without_echo_times_names_the_tag", c_dicom_no_te),
    Case("Messages", "a model file that is not a zip archive", T + "test_a_non_zip_model_file_is_not_called_missing",
         c_non_zip),
    Case("Messages", "a model with a Lambda layer (Keras safe mode)", T + "test_a_lambda_layer_refusal_says_why",
         c_lambda),
    Case("Messages", "NaN in the sidecar's EchoTime (`np.float64(nan)` in the message)",
         T + "test_no_numpy_reprs_in_messages", c_nan_message),
    Case("Messages", "a warning (NaN voxel in the mask) was printed twice", T + "test_warnings_are_printed_once",
         c_warnings_once),
    Case("Concurrency and state", "two concurrent runs in the Slicer Logic", "Testing/test_slicer_logic.py::test_a_second_run_while_one_runs_is_refused"),
    Case("Concurrency and state", "`cancel()` after a finished `wait()`", "Testing/test_slicer_logic.py::test_cancel_after_a_finished_wait_keeps_the_run_finished"),
    Case("Concurrency and state", "a user-chosen output node deleted during a run", "Testing/test_slicer_logic.py::test_an_output_volume_deleted_during_the_run_gives_a_clear_message"),
    Case("Concurrency and state", "the first cancel waits for the model to load", "Testing/test_slicer_logic.py::test_cancel_while_the_model_loads_is_prompt"),
    # issue 20
    Case("Field strength", "7 T data whose sidecar lacks MagneticFieldStrength (was read as 3 T: +21.7 pp, exit 0)",
         FS + "test_data_without_a_field_strength_is_refused_and_given_one_is_recorded", c_no_field),
    Case("Field strength", "the same with `--field-strength 7` (the outputs said 3.0 for 7 T data)",
         FS + "test_data_without_a_field_strength_is_refused_and_given_one_is_recorded", c_field_given),
    Case("Field strength", "a DICOM echo folder without MagneticFieldStrength (0018,0087)",
         FS + "test_the_dicom_field_strength_tag_is_read", c_dicom_no_field),
    Case("Field strength", "Slicer: echo volumes without the DICOM MagneticFieldStrength and no field set in the panel",
         "Testing/test_slicer_logic.py::test_the_field_strength_comes_from_dicom_or_the_panel_never_assumed"),
    Case("Field strength", "`batch`: a subject whose sidecars lack MagneticFieldStrength (fails alone; `--field-strength`)",
         BI + "test_batch_on_raw_data_fails_bad_subjects_alone"),
    Case("Commands", "`predict --help` (a \"%\" in the method help crashed it); every command's `--help`",
         "Testing/test_cli_help.py::test_help_of_every_command_works", c_help),
    Case("Commands", "TensorFlow/absl/oneDNN log lines on every command; the result line not last",
         "Testing/test_cli_help.py::test_predict_is_quiet_by_default_and_prints_its_result_last"),
    Case("Commands", "`stats --slice 999` (an IndexError traceback)",
         "Testing/test_cli_stats.py::test_a_slice_out_of_range_is_one_line_before_any_output", c_stats_slice),
    Case("Commands", "`montage --slice -1` (a negative slice was counted from the end)",
         "Testing/test_cli_stats.py::test_montage_slice_out_of_range_is_one_line", c_montage_slice),
    Case("Commands", "`montage --out DIR` (it wrote DIR.png and said DIR)",
         "Testing/test_cli_stats.py::test_montage_names_the_file_it_wrote", c_montage_dir),
    Case("Field gradients", "a field map without its unit (no --field-map-units, no sidecar Units)",
         "Testing/test_fieldmap.py::test_predict_reads_a_field_map_in_the_unit_given_or_its_sidecar_and_never_assumes_one",
         c_field_map_no_unit),
    Case("Field gradients", "a field map on another grid",
         "Testing/test_fieldmap.py::test_predict_reads_a_field_map_in_the_unit_given_or_its_sidecar_and_never_assumes_one",
         c_field_map_other_grid),
    Case("Field gradients", "a field map so steep (30 Hz per 6 mm voxel) that the last echo keeps under half its signal",
         "Testing/test_fieldmap.py::test_the_engine_with_a_field_map_maps_dephased_echoes_as_the_undephased_ones",
         c_field_map_steep),
    Case("Masks", "a mask that includes skull and scalp (the brain mask grown by a voxel; +5.4 pp, no warning)",
         FS + "test_a_mask_with_skull_is_named_in_a_warning", c_mask_skull),
    Case("Masks", "no mask: the default mask (was from echo 1, now where the QSM is defined, and said so)",
         FS + "test_without_a_mask_the_mask_is_where_the_qsm_is_defined", c_no_mask),
    Case("BIDS batch", "a raw data set without derivatives or masks (pybids: 'desc' is not a recognized entity), "
         "run-1/run-2 (were merged into 16 echoes), EchoTime in ms in one subject (aborted the cohort), one subject "
         "without the field strength", BI + "test_batch_on_raw_data_fails_bad_subjects_alone", c_raw_bids),
    Case("BIDS batch", "run-/acq- entities, sessions with a subject-level mask (silently replaced), a sidecar that is "
         "not JSON (pybids stopped the cohort)", BI + "test_inputs_of_raw_runs_sessions_and_bad_metadata"),
    Case("BIDS batch", "the only worker killed (the batch hung without a message)",
         BI + "test_a_cluster_that_loses_its_workers_or_scheduler_ends_the_run"),
    Case("BIDS batch", "the Dask scheduler killed (distributed tracebacks)",
         BI + "test_a_cluster_that_loses_its_workers_or_scheduler_ends_the_run"),
    Case("BIDS batch", "the output folder deleted during the run",
         BI + "test_an_output_folder_deleted_during_the_run_is_one_line"),
    Case("BIDS batch", "Ctrl-C during a batch (said nothing partial was kept while a .partial folder stayed)",
         BI + "test_ctrl_c_says_what_was_kept"),
    Case("BIDS batch", "a second batch into the same output while one runs",
         BI + "test_a_second_batch_into_the_same_output_is_refused", c_batch_lock),
]
HEADER = ("| # | section | input | what the tool does (observed) | test |", "|---|---|---|---|---|")


def short(text: str, root: Path) -> str:
    text = text.replace(str(root) + "/", "").replace(str(root), ".")
    text = re.sub(r"case\d\d/", "", text)
    return text.replace("|", "\\|")


def main() -> int:
    from OEFPredictorLib import simulate

    root = Path(tempfile.mkdtemp(prefix="bad_inputs_"))
    try:
        simulate.simulate_dataset(root / "sim", n_patients=1, seed=2024, voxel_size=6.0, first_index=3,
                                  noise=simulate.NoiseModel(snr=100.0, qsm_noise_ppb=2.0), independent_fraction=0.0)
        ctx = Ctx(root, root / "sim" / "P03")
        lines = [
            "# Bad inputs: what the tool does",
            "",
            "Every case of issues 12 and 20, run for real by `docs/bad_inputs.py` (a 6 mm virtual patient, SNR 100,",
            "the default method unless the row says otherwise, the `oefpredictor` command in-process); \"observed\" is the exit code and what it",
            "printed (temporary paths shortened). Exit code 2: a one-line error, nothing written. Rows without",
            "an observation are checked only by their test. Rebuild: `.venv/bin/python docs/bad_inputs.py`.",
            "",
            *HEADER,
        ]
        for i, case in enumerate(CASES, 1):
            if case.run is None:
                observed = "(checked by the test)" if "::" in case.test else "(not part of this table's runs)"
            else:
                start = time.perf_counter()
                code, text = case.run(ctx)
                raw = not isinstance(text, Observed) and (text.startswith(chr(10)) or "oefpredictor" in text)
                observed = f"exit {code}: {said(text) if raw else text}"
                print(f"{i:2d} {case.given[:60]:<60} exit {code} ({time.perf_counter() - start:.1f} s)", flush=True)
            lines.append(f"| {i} | {case.section} | {case.given} | {short(observed, root)} | `{case.test}` |")
        (HERE / "bad_inputs.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
        print(f"Wrote {HERE / 'bad_inputs.md'}")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
