"""Virtual patients and their files: exact forward model, noise levels, determinism, bad input."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from OEFPredictorLib import cli, io, phantom, physics, simulate


def _forward(data):
    t = data.truth
    echoes = physics.qbold_signal(t["S0"], t["R2"], t["Y"], t["v"], t["chi_nb"], data.protocol)
    return echoes, physics.qsm_value(t["Y"], t["v"], t["chi_nb"])


def test_noise_free_files_equal_the_forward_model_of_the_truth(tiny_dataset):
    for folder in simulate.list_patients(tiny_dataset):
        data = simulate.load_patient(folder)
        echoes, qsm = _forward(data)
        m = data.mask
        rel = np.abs(data.echoes[m] - echoes[m]) / np.abs(echoes[m])
        assert rel.max() < 1e-3
        assert np.abs(data.qsm[m] - qsm[m]).max() < 1e-3 * np.abs(qsm[m]).max()
        assert np.all(data.echoes[~m] == 0) and np.all(data.qsm[~m] == 0)
        np.testing.assert_allclose(data.truth["OEF"][m], 100 * (1 - data.truth["Y"][m] / 0.98), atol=1e-3)


def test_noisy_files_have_the_requested_snr_and_qsm_noise(tiny_noisy_dataset):
    data = simulate.load_patient(tiny_noisy_dataset / "P03")
    echoes, qsm = _forward(data)
    m = data.mask & (echoes[..., 0] > 0)
    mean_s1 = echoes[..., 0][m].mean()
    # At SNR 100 the Rician noise in the brain is Gaussian to a good approximation.
    sigma = np.std(data.echoes[..., 0][m] - echoes[..., 0][m])
    assert mean_s1 / sigma == pytest.approx(100.0, rel=0.10)
    assert data.sidecar["SNR"] == 100.0
    qsm_sd_ppb = 1000 * np.std(data.qsm[data.mask] - qsm[data.mask])
    assert qsm_sd_ppb == pytest.approx(2.0, rel=0.10)
    # Background: the modulus of pure complex noise (Rayleigh) has mean sigma * sqrt(pi / 2).
    background = data.echoes[..., -1][~data.mask]
    assert background.mean() == pytest.approx(sigma * np.sqrt(np.pi / 2), rel=0.10)


def test_same_seed_same_files_and_patients_do_not_depend_on_the_count(tmp_path, tiny_dataset):
    simulate.simulate_dataset(tmp_path / "again", n_patients=1, seed=11, voxel_size=4.0, lesions=True,
                              noise=simulate.NoiseModel(snr=None, qsm_noise_ppb=0.0))
    a = simulate.load_patient(tiny_dataset / "P01")
    b = simulate.load_patient(tmp_path / "again" / "P01")
    assert np.array_equal(a.echoes, b.echoes) and np.array_equal(a.labels, b.labels)
    other = simulate.simulate_dataset(tmp_path / "seed12", n_patients=1, seed=12, voxel_size=4.0,
                                      lesions=True, noise=simulate.NoiseModel(snr=None))
    assert not np.array_equal(simulate.load_patient(other[0]).echoes.shape, a.echoes.shape) or \
        not np.array_equal(simulate.load_patient(other[0]).echoes, a.echoes)


def test_patients_have_tissues_lesions_and_bounded_parameters():
    patient = phantom.make_patient(5, phantom.PatientConfig(voxel_size=3.0, lesions=True))
    present = set(np.unique(patient.labels))
    assert {1, 2, 3, 5} <= present  # cortical GM, WM, deep GM, CSF
    assert present & {6, 7}, "a patient asked to have lesions has one"
    m = patient.metric_mask
    for name in ("R2", "Y", "v", "chi_nb"):
        lo, hi = physics.BOUNDS[name]
        assert patient.params[name][m].min() >= lo - 1e-6 and patient.params[name][m].max() <= hi + 1e-6
    gm, wm = (patient.labels == 1), (patient.labels == 2)
    assert patient.params["R2"][wm].mean() > patient.params["R2"][gm].mean()  # priors: WM 17, GM 14 Hz
    for lesion in patient.lesions:
        low, high = (55, 80) if lesion["type"] == "misery_perfusion" else (6, 23)
        assert low - 0.5 <= lesion["mean_OEF_percent"] <= high + 0.5
    # Each lesion has a contralateral mirror region of comparable size in the lesion map.
    for code in (1, 2):
        if (patient.lesion_map == code).any():
            assert (patient.lesion_map == code + 2).sum() > 0.3 * (patient.lesion_map == code).sum()


def test_training_patients_carry_tissue_independent_parameters():
    plausible = phantom.make_patient(7, phantom.PatientConfig(voxel_size=4.0, lesions=False))
    mixed = phantom.make_patient(7, phantom.PatientConfig(voxel_size=4.0, lesions=False, independent_fraction=0.5))
    outside = lambda p: np.mean((p.params["Y"][p.metric_mask] < 0.35) | (p.params["Y"][p.metric_mask] > 0.80))
    assert outside(plausible) == 0.0
    assert outside(mixed) > 0.15


def test_geometry_is_written_and_differs_between_voxel_sizes(tiny_dataset):
    data = simulate.load_patient(tiny_dataset / "P01")
    assert data.geometry.spacing == (4.0, 4.0, 4.0)
    _, mask_geometry = io.read_volume(simulate.patient_files(tiny_dataset / "P01")["mask"])
    assert mask_geometry.matches(data.geometry)
    assert data.echoes.shape == data.mask.shape + (8,)
    assert (tiny_dataset / "participants.tsv").read_text().count("\n") == 3


@pytest.mark.parametrize("arguments, message", [
    (["--snr", "-5"], "--snr must be positive"),
    (["--te", "9.5,4.5,14.5"], "strictly increasing"),
    (["--te=-4.5,9.5"], "positive"),
    (["--te", "0.0045,0.0095,0.0145"], "looks like seconds"),
    (["--qsm-noise-ppb", "-1"], "zero or positive"),
])
def test_bad_input_gives_one_line_exit_2_and_no_patient_folder(tmp_path, capsys, arguments, message):
    out = tmp_path / "out"
    code = cli.main(["simulate", "--out", str(out), "--patients", "1", "--voxel-size", "6"] + arguments)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert message in err and "\n" not in err
    assert not out.exists()


def test_unwritable_output_folder_is_refused(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    code = cli.main(["simulate", "--out", str(blocker / "data"), "--patients", "1", "--voxel-size", "6"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "not a writable folder" in err and "\n" not in err
    assert blocker.read_text() == "not a folder"


def test_existing_patient_folder_is_refused_without_overwrite(tmp_path, capsys):
    (tmp_path / "P01").mkdir()
    code = cli.main(["simulate", "--out", str(tmp_path), "--patients", "1", "--voxel-size", "6"])
    assert code == 2 and "--overwrite" in capsys.readouterr().err
    assert list((tmp_path / "P01").iterdir()) == []


def test_console_command_simulates_and_draws_a_montage(tmp_path):
    out = tmp_path / "set"
    # The progress bar is Unicode; CI may run under an ASCII locale, so decode explicitly.
    run = lambda *a: subprocess.run([sys.executable, "-m", "OEFPredictorLib.cli", *a], capture_output=True,
                                    encoding="utf-8", errors="replace",
                                    cwd=Path(__file__).parent.parent / "OEFPredictor")
    result = run("simulate", "--out", str(out), "--patients", "1", "--voxel-size", "6", "--no-noise",
                 "--te", "4.5,9.5,14.5,19.5", "--seed", "3")
    assert result.returncode == 0, result.stderr
    data = simulate.load_patient(out / "P01")
    assert data.protocol.echo_times_ms == [4.5, 9.5, 14.5, 19.5]
    assert not list(out.glob(".*partial*"))
    png = tmp_path / "montage.png"
    result = run("montage", str(out / "P01"), "--out", str(png))
    assert result.returncode == 0, result.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
