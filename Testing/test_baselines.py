"""The classical QQ methods (baselines.py): NLLS, CAT and CCM.

Tolerances on the noise-free 4 mm patients (tiny_dataset, 1500 brain voxels without CSF):
- NLLS: median |Y error| < 0.01, median |R2 error| < 0.05 Hz, median |chi_nb error| < 1 ppb,
  and >= 85 % of voxels within 0.02 in Y. Not all: the training patients have half their voxels
  drawn uniformly within the bounds, where some (tiny v, or dw t in the quadratic regime) are
  degenerate at float32 precision of the stored echoes (equally good fits with other Y).
- CAT with its default 3 damped refinement steps stays near the cluster fit by design (that is its
  regularisation); 5-20 clusters cannot represent uniformly drawn voxels, so: median |Y error|
  < 0.1 and median |R2 error| < 2 Hz. Refined to convergence it must match NLLS (median < 0.01).
- CCM interpolates a 200k-entry database in a 4-D parameter space: median |Y error| < 0.08,
  median |R2 error| < 1.5 Hz; a voxel equal to a database entry gets that entry back exactly.
"""
from __future__ import annotations

import threading

import numpy as np
import pytest

from OEFPredictorLib import baselines, physics, simulate
from OEFPredictorLib.errors import CancelledError, InputError

PROTOCOL = physics.Protocol.default()
NAMES = physics.PARAMETER_NAMES


@pytest.fixture(scope="module")
def block(tiny_dataset):
    """1500 brain (non-CSF) voxels of a noise-free patient: echoes, QSM, truth (S0 in input units)."""
    p = simulate.load_patient(simulate.list_patients(tiny_dataset)[0])
    idx = np.flatnonzero(p.metric_mask)
    idx = np.sort(np.random.default_rng(0).choice(idx, 1500, replace=False))
    echoes = p.echoes.reshape(-1, p.protocol.n_echoes)[idx].astype(float)
    qsm = p.qsm.reshape(-1)[idx].astype(float)
    truth = {k: p.truth[k].reshape(-1)[idx].astype(float) for k in NAMES}
    return echoes, qsm, truth, p.protocol


def _abs_errors(out, truth, echo1):
    err = {k: np.abs(out[k] - truth[k]) for k in NAMES}
    err["S0"] = err["S0"] / echo1
    return err


def test_fs_lookup_matches_physics():
    x = np.linspace(-30, 30, 10001)
    f, d = baselines.fs_and_derivative(x)
    assert np.allclose(f, physics.fs(x), atol=1e-7)
    assert np.allclose(d, physics.fs_derivative(x), atol=1e-6)
    f_far, d_far = baselines.fs_and_derivative(np.array([-500.0, 500.0]))
    assert np.allclose(f_far, 499.0) and np.allclose(d_far, [-1.0, 1.0])


def test_jacobian_matches_finite_differences():
    rng = np.random.default_rng(3)
    n = 200
    lo, hi = baselines._LO, baselines._HI
    p = lo + (hi - lo) * rng.uniform(0.05, 0.95, (n, 5))
    s = rng.uniform(0.3, 1.0, (n, PROTOCOL.n_echoes))
    chi = rng.normal(0, 0.03, n)
    w_s, w_q = rng.uniform(50, 200, n), rng.uniform(100, 1000, n)
    r, J = baselines.residuals_and_jacobian(p, s, chi, w_s, w_q, PROTOCOL)
    assert r.shape == (n, PROTOCOL.n_echoes + 1) and J.shape == (5, n, PROTOCOL.n_echoes + 1)
    for k in range(5):
        h = 1e-6 * (hi[k] - lo[k])
        dp = np.zeros(5)
        dp[k] = h
        rp, _ = baselines.residuals_and_jacobian(p + dp, s, chi, w_s, w_q, PROTOCOL, jacobian=False)
        rm, _ = baselines.residuals_and_jacobian(p - dp, s, chi, w_s, w_q, PROTOCOL, jacobian=False)
        fd = (rp - rm) / (2 * h)
        scale = np.abs(J[k]).max() + 1e-12
        assert np.abs(fd - J[k]).max() < 2e-3 * scale, NAMES[k]
    # and the residuals are the forward model's: r = (m - s) w_s, (q - chi) w_q
    m = physics.qbold_signal(*(p[:, i] for i in range(5)), PROTOCOL)
    q = physics.qsm_value(p[:, 2], p[:, 3], p[:, 4])
    assert np.allclose(r[:, :-1], (m - s) * w_s[:, None], atol=1e-5)
    assert np.allclose(r[:, -1], (q - chi) * w_q)


def test_cholesky_solver():
    rng = np.random.default_rng(1)
    B = rng.normal(size=(5, 9, 300))
    A = np.einsum("ijn,kjn->ikn", B, B)
    g = rng.normal(size=(5, 300))
    x = baselines._solve_spd(A, g)
    assert np.allclose(np.einsum("ikn,kn->in", A, x), g, atol=1e-8)


# physics.md's reference cases (R2, Y, v, chi_nb), S0 = 1
REFERENCE_CASES = [(14, 0.58, 0.035, -0.03), (17, 0.58, 0.025, -0.04), (14, 0.392, 0.035, -0.03),
                   (12, 0.833, 0.02, -0.02)]


def test_nlls_recovers_reference_cases_exactly():
    p = np.array(REFERENCE_CASES, float)
    S0 = np.array([1.0, 2.0, 500.0, 1e4])  # any input units
    echoes = physics.qbold_signal(S0, p[:, 0], p[:, 1], p[:, 2], p[:, 3], PROTOCOL)
    qsm = physics.qsm_value(p[:, 1], p[:, 2], p[:, 3])
    out = baselines.predict_voxels("nlls", echoes, qsm, PROTOCOL, noise_sigma=1e-3 * echoes[:, 0].min())
    assert np.allclose(out["Y"], p[:, 1], atol=1e-3)
    assert np.allclose(out["v"], p[:, 2], atol=1e-4)
    assert np.allclose(out["R2"], p[:, 0], atol=0.01)
    assert np.allclose(out["chi_nb"], p[:, 3], atol=1e-4)
    assert np.allclose(out["S0"], S0, rtol=1e-4)


def test_nlls_recovers_noise_free_patient(block):
    echoes, qsm, truth, protocol = block
    out = baselines.predict_voxels("nlls", echoes, qsm, protocol)
    err = _abs_errors(out, truth, echoes[:, 0])
    assert np.median(err["Y"]) < 0.01
    assert np.median(err["R2"]) < 0.05
    assert np.median(err["chi_nb"]) < 0.001
    assert np.median(err["S0"]) < 0.001
    assert np.mean(err["Y"] < 0.02) >= 0.85


def test_cat_recovers_noise_free_patient(block):
    echoes, qsm, truth, protocol = block
    out = baselines.predict_voxels("cat", echoes, qsm, protocol)
    err = _abs_errors(out, truth, echoes[:, 0])
    assert np.median(err["Y"]) < 0.1
    assert np.median(err["R2"]) < 2.0
    converged = baselines.predict_voxels("cat", echoes, qsm, protocol, cat_refine_iterations=80)
    err = _abs_errors(converged, truth, echoes[:, 0])
    assert np.median(err["Y"]) < 0.01


def test_ccm_recovers_noise_free_patient(block):
    echoes, qsm, truth, protocol = block
    out = baselines.predict_voxels("ccm", echoes, qsm, protocol)
    err = _abs_errors(out, truth, echoes[:, 0])
    assert np.median(err["Y"]) < 0.08
    assert np.median(err["R2"]) < 1.5


def test_ccm_exact_member_is_matched():
    rng = np.random.default_rng(5)
    n = 3000
    params = {k: rng.uniform(*physics.BOUNDS[k], n) for k in ("R2", "Y", "v", "chi_nb")}
    db = baselines.CCMDatabase(params, PROTOCOL, 0.01, 0.002, n_clusters=8)
    pick = rng.choice(n, 50, replace=False)
    echoes = physics.qbold_signal(1.0, *(params[k][pick] for k in ("R2", "Y", "v", "chi_nb")), PROTOCOL)
    qsm = physics.qsm_value(params["Y"][pick], params["v"][pick], params["chi_nb"][pick])
    out = db.match(echoes / echoes[:, :1], qsm, k=5)
    assert np.allclose(out[:, 2], params["Y"][pick], atol=1e-6)
    assert np.allclose(out[:, 1], params["R2"][pick], atol=1e-4)


@pytest.mark.parametrize("method", baselines.METHODS)
def test_predict_voxels_contract(method):
    """Keys, shapes, bounds on arbitrary data, S0 in input units, NaN for unusable voxels."""
    rng = np.random.default_rng(7)
    n = 400
    echoes = rng.uniform(0.1, 1.2, (n, PROTOCOL.n_echoes)) * 800.0  # not QQ-shaped at all
    echoes[:, 0] = 800.0
    qsm = rng.normal(0, 0.1, n)
    echoes[0, 0] = 0.0
    qsm[1] = np.nan
    out = baselines.predict_voxels(method, echoes, qsm, PROTOCOL)
    assert set(out) == set(NAMES)
    for k in NAMES:
        assert out[k].shape == (n,)
        assert np.isnan(out[k][:2]).all()
        lo, hi = physics.BOUNDS[k]
        scale = echoes[2:, 0] if k == "S0" else 1.0
        assert np.all(out[k][2:] >= lo * scale - 1e-9) and np.all(out[k][2:] <= hi * scale + 1e-9), k
    # S0 follows the input scale; the other parameters do not depend on it
    again = baselines.predict_voxels(method, echoes * 3.0, qsm, PROTOCOL)
    assert np.allclose(again["S0"][2:], 3.0 * out["S0"][2:], rtol=1e-6)
    assert np.allclose(again["Y"][2:], out["Y"][2:], atol=1e-6)


def test_predict_voxels_progress_and_cancel(block):
    echoes, qsm, _, protocol = block
    seen = []
    baselines.predict_voxels("nlls", echoes[:300], qsm[:300], protocol, progress=lambda f, m: seen.append(f),
                             batch_size=100)
    assert seen == sorted(seen) and seen[-1] == 1.0 and len(seen) == 3
    for method in baselines.METHODS:
        event = threading.Event()

        def cancel_after_first(fraction, message):
            event.set()

        with pytest.raises(CancelledError):
            baselines.predict_voxels(method, echoes[:300], qsm[:300], protocol, progress=cancel_after_first,
                                     cancel_event=event, batch_size=100)


def test_predict_voxels_bad_input():
    with pytest.raises(InputError, match="Unknown method"):
        baselines.predict_voxels("qqnet", np.ones((3, 8)), np.zeros(3), PROTOCOL)
    with pytest.raises(InputError, match="Expected echoes"):
        baselines.predict_voxels("nlls", np.ones((3, 6)), np.zeros(3), PROTOCOL)


def test_noise_estimate(tiny_noisy_dataset):
    p = simulate.load_patient(simulate.list_patients(tiny_noisy_dataset)[0])
    rows = p.echoes[p.metric_mask].astype(float)
    sigma = baselines.estimate_noise_sigma(rows, p.protocol)
    assert abs(sigma / p.sidecar["NoiseSigma"] - 1) < 0.1


def test_registered_in_evaluate(tiny_noisy_dataset):
    """`oefpredictor evaluate --methods nlls,cat,ccm` runs them on the same voxels as the others."""
    from OEFPredictorLib import evaluate

    ev = evaluate.evaluate(tiny_noisy_dataset, ["tissue_mean", "nlls", "cat", "ccm"], max_voxels_per_patient=400)
    assert ev.patients == ["P03"]
    rows = {r["method"]: r for r in ev.per_patient}
    assert len({r["n_voxels"] for r in rows.values()}) == 1
    for m in ("nlls", "cat", "ccm"):
        assert np.isfinite(rows[m]["rmse_OEF"]) and rows[m]["seconds"] > 0
    # at SNR 100 the voxelwise fit is far noisier than the cluster-regularised methods
    assert rows["nlls"]["rmse_OEF"] > rows["cat"]["rmse_OEF"] and rows["nlls"]["rmse_OEF"] > rows["ccm"]["rmse_OEF"]


def test_nlls_finds_cost_below_truth_on_noisy_data(tiny_noisy_dataset):
    """At SNR 100 the fit's large Y errors are the problem's ill-posedness, not the optimiser: for
    (almost) every voxel the solution's cost is at most the cost of the true parameters."""
    p = simulate.load_patient(simulate.list_patients(tiny_noisy_dataset, "test")[0])
    idx = np.flatnonzero(p.metric_mask)
    idx = np.sort(np.random.default_rng(1).choice(idx, 800, replace=False))
    echoes = p.echoes.reshape(-1, 8)[idx].astype(float)
    qsm = p.qsm.reshape(-1)[idx].astype(float)
    truth = np.stack([p.truth[k].reshape(-1)[idx] for k in NAMES], axis=1).astype(float)
    truth[:, 0] /= echoes[:, 0]
    s = echoes / echoes[:, :1]
    w_s = echoes[:, 0] / p.sidecar["NoiseSigma"]
    w_q = np.full(len(s), 1.0 / (p.sidecar["QSMNoisePPB"] * 1e-3))
    fit, cost = baselines.fit_nlls(s, qsm, w_s, w_q, p.protocol)
    r, _ = baselines.residuals_and_jacobian(truth, s, qsm, w_s, w_q, p.protocol, jacobian=False)
    assert np.mean(cost <= (r ** 2).sum(1) * (1 + 1e-6)) > 0.98
    assert np.median(cost) < 9  # E + 1 = 9 noise-normalised residuals, 5 fitted
