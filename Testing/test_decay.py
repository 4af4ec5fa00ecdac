"""The protocol-free inputs of the default model (decay.py): any echo protocol and field strength gives
the same numbers for the same tissue, a QSM reference offset changes nothing, and protocols outside the
supported range are refused in one line (real physics, no network needed)."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from OEFPredictorLib import decay, models, physics, spatial
from OEFPredictorLib.training import context as train_context, data
from OEFPredictorLib.errors import InputError

# GM, WM, a misery-perfusion and an infarct-core voxel (S0, R2 at 3 T, Y, v, chi_nb)
TISSUES = np.array([[1.0, 14.0, 0.58, 0.035, -0.03], [1.0, 17.0, 0.58, 0.025, -0.04],
                    [1.0, 14.0, 0.30, 0.045, -0.03], [1.0, 12.0, 0.85, 0.02, -0.02]])


def canonical(protocol, r2):
    s = physics.qbold_signal(TISSUES[:, 0], r2, TISSUES[:, 2], TISSUES[:, 3], TISSUES[:, 4], protocol)
    return np.log(s) @ decay.canonical_matrix(protocol).T


def test_a_field_strength_is_its_3t_equivalent_echo_times():
    """7 T at t * 3/7 dephases as 3 T at t: with R2 in 3 T-equivalent time the inputs are identical."""
    paper = physics.Protocol.default()
    seven = physics.Protocol(tuple(paper.te * 3.0 / 7.0), 7.0)
    np.testing.assert_allclose(decay.equivalent_times(seven), paper.te, rtol=1e-12)
    r2_seven = TISSUES[:, 1] / decay.r2_3t_equivalent_factor(seven)
    np.testing.assert_allclose(canonical(seven, r2_seven), canonical(paper, TISSUES[:, 1]), atol=1e-5)
    # read as 3 T, the same data would look like another tissue
    wrong = physics.Protocol(seven.echo_times, 3.0)
    assert np.abs(canonical(wrong, r2_seven) - canonical(paper, TISSUES[:, 1])).max() > 0.05


@pytest.mark.parametrize("te_ms", [[3.5 + 4.1 * i for i in range(12)], [2.8, 5.1, 8.9, 12.2, 17.0, 21.1, 26.9, 31.0],
                                   [3.0 + 6.2 * i for i in range(7)]])
def test_other_echo_trains_give_the_same_curve_where_both_measured(te_ms):
    paper = physics.Protocol.default()
    other = physics.Protocol.from_milliseconds(te_ms, 3.0)
    a, b = canonical(paper, TISSUES[:, 1]), canonical(other, TISSUES[:, 1])
    times = np.asarray(decay.CANONICAL_MS)
    both = (times >= max(paper.echo_times_ms[0], te_ms[0])) & (times <= min(paper.echo_times_ms[-1], te_ms[-1]))
    assert both.sum() >= 4
    # the curves' shapes (relative to a shared canonical time) agree within a fraction of the tissue contrast
    first = np.flatnonzero(both)[0]
    shape_a, shape_b = (x[:, both] - x[:, [first]] for x in (a, b))
    np.testing.assert_allclose(shape_a, shape_b, atol=0.01)
    contrast = np.abs(shape_a[2] - shape_a[0]).max()  # misery perfusion vs GM
    assert contrast > 0.05


def test_the_inputs_ignore_a_per_voxel_scale_and_a_constant_qsm_offset():
    rng = np.random.default_rng(0)
    protocol = physics.Protocol.from_milliseconds([2.0 + 3.0 * i for i in range(10)], 3.0)
    np.testing.assert_allclose(decay.canonical_matrix(protocol).sum(axis=1), 0.0, atol=1e-5)
    shape = (10, 12, 9)
    mask = np.zeros(shape, bool)
    mask[2:-2, 2:-2, 2:-2] = True
    params = TISSUES[rng.integers(0, 4, shape)]
    echoes = physics.qbold_signal(*(params[..., i] for i in range(5)), protocol).astype(np.float32)
    echoes *= rng.uniform(0.5, 2.0, shape)[..., None].astype(np.float32)  # receive bias
    qsm = (physics.qsm_value(params[..., 2], params[..., 3], params[..., 4])
           + rng.normal(0, 0.002, shape)).astype(np.float32)
    spec = models.CONTEXT_NET

    def inputs(q):
        reference, _ = decay.qsm_reference(echoes[..., 0][mask], echoes[..., -1][mask], q[mask], protocol)
        f = spatial.volume_features(echoes * mask[..., None], q * mask, mask, 10.0, reference)
        return spatial.network_inputs(f, mask, spec, 2.0, protocol)

    base = inputs(qsm)
    assert base.shape[-1] == spatial.context_feature_count(spec)
    np.testing.assert_allclose(inputs(qsm + 0.05), base, atol=1e-4)
    np.testing.assert_allclose(inputs(qsm - 0.04), base, atol=1e-4)
    # the QSM channels do carry the voxels' differences
    n_base = len(decay.CANONICAL_MS) + 1
    assert base[..., n_base - 1][mask].std() > 0.05


def test_the_supported_range_is_checked_in_one_line():
    supported = decay.SUPPORTED
    for te_ms, b0 in (([4.5 + 5 * i for i in range(8)], 3.0), ([1.5 + 1.5 * i for i in range(16)], 7.0),
                      ([8.0, 16.0, 24.0, 32.0, 40.0, 48.0, 56.0], 1.5)):
        assert supported.problems(physics.Protocol.from_milliseconds(te_ms, b0)) == []
    for te_ms, b0, what in (([4.5 + 5 * i for i in range(8)], 9.4, "9.4 T"),
                            ([2.0 + 2 * i for i in range(20)], 3.0, "20 echoes"),
                            ([1.0, 3.0, 5.0, 7.0, 9.0, 11.0, 13.0, 15.0], 3.0, "first echo 1 ms"),
                            ([5.0, 15.0, 25.0, 35.0, 45.0, 55.0], 3.0, "echo spacing 10-10 ms"),
                            ([3.0 + 1.5 * i for i in range(8)], 3.0, "last echo 13.5 ms")):
        with pytest.raises(InputError) as err:
            supported.check(physics.Protocol.from_milliseconds(te_ms, b0), "m.keras")
        message = str(err.value)
        assert what in message and "--method cat" in message and "1.5-7 T" in message and "\n" not in message


def test_training_protocols_cover_the_supported_range_and_little_more():
    rng = np.random.default_rng(1)
    protocols = [data.random_protocol(rng, decay.SUPPORTED) for _ in range(400)]
    n = np.array([p.n_echoes for p in protocols])
    first = np.array([p.echo_times_ms[0] for p in protocols])
    last = np.array([p.echo_times_ms[-1] for p in protocols])
    b0 = np.array([p.field_strength for p in protocols])
    assert n.min() == 5 and n.max() == 16
    assert first.min() < 2.0 and first.max() > 7.5 and last.min() < 17.0 and last.max() > 58.0
    assert b0.min() < 1.7 and b0.max() > 6.5 and 1.3 < b0.min() and b0.max() < 7.8
    assert any(np.ptp(np.diff(p.echo_times_ms)) > 0.5 for p in protocols)  # uneven spacings too


def test_training_targets_hold_r2_in_3t_equivalent_time():
    config = train_context.ContextTrainConfig(voxel_size_mm=4.0)
    patient = data.make_patient(data.TRAIN_SEED, 0, config)
    seven = physics.Protocol.from_milliseconds([2.0 + 2.0 * i for i in range(10)], 7.0)
    _, _, t3 = data.signals(patient, physics.Protocol.default(), 0.5)
    _, _, t7 = data.signals(patient, seven, 0.5)
    m = patient.metric & (t3[..., 1] * (7 / 3) ** 0.5 < physics.BOUNDS["R2"][1])
    np.testing.assert_allclose(t7[..., 1][m], t3[..., 1][m] * (7 / 3) ** 0.5 * 3 / 7, rtol=2e-3)


def test_decode_gives_real_time_r2_and_mondrian_interval_factors():
    scaling = {"mean": [1.0, 15.0, 0.6, 0.03, -0.02], "std": [0.1, 5.0, 0.1, 0.01, 0.03]}
    raw = np.zeros((6, spatial.N_OUTPUTS), np.float32)
    raw[:, 2] = np.array([0, 0, 0, 0, -2.0, 2.0])  # two voxels far from the brain median
    raw[:, 5] = np.array([-3.0, 0.0, 1.0, 1.0, -3.0, -3.0])  # the half-width below: 0.5, 6.9, 13 pp
    raw[:, 6] = raw[:, 5]
    at3 = spatial.decode(raw, np.ones(6, np.float32), scaling, 1.0)
    at7 = spatial.decode(raw, np.ones(6, np.float32), scaling, 1.0, r2_factor=7 / 3)
    np.testing.assert_allclose(at7["R2"], np.minimum(at3["R2"] * 7 / 3, physics.BOUNDS["R2"][1]), rtol=1e-5)
    mondrian = {"width_edges_pp": [5.0], "abnormality_edges_pp": [10.0], "factors": [[1.0, 2.0], [3.0, 4.0]]}
    out = spatial.decode(raw, np.ones(6, np.float32), scaling, mondrian)
    half = at3["OEF_p95"] - at3["OEF"]
    factor = (out["OEF_p95"] - out["OEF"]) / half
    # normal voxels: 1 where the network's half-width is under 5 pp, else 2; far from the median: 3
    np.testing.assert_allclose(half[:4] > 5.0, [False, True, True, True])
    np.testing.assert_allclose(factor, [1.0, 2.0, 2.0, 2.0, 3.0, 3.0], rtol=1e-4)


def test_qsm_is_referenced_to_the_brains_csf_and_a_mask_without_csf_is_named():
    """On a virtual patient the slowest-decaying voxels are CSF, and their QSM is the reference."""
    from OEFPredictorLib import phantom, simulate

    patient = phantom.make_patient(np.random.SeedSequence([77, 0]), phantom.PatientConfig.stroke(4.0))
    protocol = physics.Protocol.from_milliseconds([3.0 + 3.5 * i for i in range(10)], 3.0)
    echoes, qsm, _ = simulate.synthesize(patient.params, patient.mask, protocol, simulate.NoiseModel(100.0, 2.0),
                                         np.random.default_rng(0))
    m = patient.mask
    csf = patient.labels[m] == phantom.CSF_LABEL
    reference, warning = decay.qsm_reference(echoes[..., 0][m], echoes[..., -1][m], qsm[m], protocol)
    assert warning is None
    # the CSF's level (partial-volume CSF voxels included: within a few ppb), not the brain's median
    assert abs(reference - np.median(qsm[m][csf])) < 0.005 < abs(reference - np.median(qsm[m]))
    shifted, _ = decay.qsm_reference(echoes[..., 0][m], echoes[..., -1][m], qsm[m] + 0.04, protocol)
    assert abs(shifted - reference - 0.04) < 1e-6
    tissue = ~csf
    reference, warning = decay.qsm_reference(echoes[..., 0][m][tissue], echoes[..., -1][m][tissue],
                                             qsm[m][tissue], protocol)
    assert "no CSF" in warning and "\n" not in warning
    assert abs(reference - (np.median(qsm[m][tissue]) - decay.BRAIN_MINUS_CSF_PPM)) < 1e-6


def test_the_lesion_slice_shows_both_kinds_where_a_slice_does():
    from OEFPredictorLib import figures

    lesions = np.zeros((6, 4, 4), np.uint8)
    lesions[1, :3, :3] = 1  # the biggest, penumbra only
    lesions[3, 0, :2], lesions[3, 1, 0] = 1, 2  # both kinds
    lesions[4, 0, 0] = 2
    assert figures.lesion_slice(lesions, np.ones(lesions.shape, bool)) == 3
    lesions[3] = 0
    assert figures.lesion_slice(lesions, np.ones(lesions.shape, bool)) == 1


# --- Resampling another echo train to a model's own protocol (the default context model) ----------
PAPER = physics.Protocol.default()


def test_resampling_another_echo_train_is_exact_on_qq_decays_where_the_linear_fit_alone_is_not():
    """12 echoes (3.5-48.6 ms) read at the paper's 8 echo times: within 2e-4 in log signal for QQ tissue of
    every kind; the basis fit alone is off by about 1e-3, which biased the bundled model by 7 pp OEF."""
    rng = np.random.default_rng(0)
    n = 400
    r2, y, v, chi = (rng.uniform(8, 25, n), rng.uniform(0.3, 0.85, n), rng.uniform(0.01, 0.07, n),
                     rng.uniform(-0.08, 0.05, n))
    twelve = physics.Protocol.from_milliseconds([3.5 + 4.1 * i for i in range(12)], 3.0)
    logs = np.log(physics.qbold_signal(1.0, r2, y, v, chi, twelve))
    truth = np.log(physics.qbold_signal(1.0, r2, y, v, chi, PAPER))
    linear_only = logs @ decay.resampling_matrix(twelve, PAPER).T
    assert np.abs(linear_only - truth).max() > 1e-3
    np.testing.assert_allclose(decay.resample_log_echoes(logs, twelve, PAPER), truth, atol=2e-4)


@pytest.mark.parametrize("te_ms, target, linear_error, tolerance", [
    ([8.0 + 4.5 * i for i in range(8)], PAPER, 1e-2, 5e-4),  # first echo 3.5 ms late
    ([3.0 + 3.0 * i for i in range(6)], physics.Protocol.from_milliseconds([4.5 + 2.5 * i for i in range(8)]),
     5e-3, 2e-4),  # last echo 4 ms short of the 4.5-22 ms network's
])
def test_a_decay_continued_beyond_its_echoes_follows_the_qq_curve(te_ms, target, linear_error, tolerance):
    """Where a model's echo times lie beyond the data (a first echo up to 4 ms late, or the short-span network's
    last echo up to 4 ms early), the resampled decay is the voxel's qBOLD curve continued: exact on noise-free QQ
    decays within `tolerance`, where the linear continuation alone is off by more than `linear_error`."""
    rng = np.random.default_rng(0)
    n = 400
    r2, y, v, chi = (rng.uniform(8, 25, n), rng.uniform(0.3, 0.85, n), rng.uniform(0.01, 0.07, n),
                     rng.uniform(-0.08, 0.05, n))
    source = physics.Protocol.from_milliseconds(te_ms, 3.0)
    assert decay.extrapolated_ms(source, target) == pytest.approx(3.5 if te_ms[0] > 4.5 else 4.0)
    logs = np.log(physics.qbold_signal(1.0, r2, y, v, chi, source))
    truth = np.log(physics.qbold_signal(1.0, r2, y, v, chi, target))
    assert np.abs(logs @ decay.resampling_matrix(source, target).T - truth).max() > linear_error
    np.testing.assert_allclose(decay.resample_log_echoes(logs, source, target), truth, atol=tolerance)


def test_a_sparse_train_resampled_from_noisy_data_keeps_its_curvature_on_average():
    """6 echoes 7.8 ms apart (3.6 T, in 3 T-equivalent time): the correction's dw fitted voxel by voxel to noisy
    data is biased, and the resampled curvature came out about 0.001 off on average (the map then read OEF
    6-8 points high); with dw drawn towards the region's (here: the noise-free curve, as heavy smoothing gives
    in uniform tissue) the mean error stays within 3e-4. R2 is compared in 3 T-equivalent time."""
    rng = np.random.default_rng(3)
    sparse = physics.Protocol.from_milliseconds([3.5 + 6.55 * i for i in range(6)], 3.6)
    n, sd = 4000, 0.002
    for y in (0.5, 0.6, 0.7):
        clean = np.log(physics.qbold_signal(1.0, np.full(n, 15.0), y, 0.03, -0.02, sparse))
        truth = np.log(physics.qbold_signal(1.0, np.full(n, 15.0 * 3.0 / 3.6), y, 0.03, -0.02, PAPER))
        noisy, smoothed = (clean + rng.normal(0.0, sd, clean.shape) for _ in range(2))
        regional = np.repeat(clean[:1], n, axis=0)

        def mean_curvature_error(resampled):
            error = resampled - truth
            return np.abs((error - error[:, :1]).mean(axis=0)).max()

        assert mean_curvature_error(decay.resample_log_echoes(noisy, sparse, PAPER, smoothed)) > 5e-4
        assert mean_curvature_error(decay.resample_log_echoes(noisy, sparse, PAPER, smoothed, regional, sd ** 2)) < 3e-4
        # noise-free data stay exact with the prior (its weight vanishes against a vanishing noise variance)
        np.testing.assert_allclose(decay.resample_log_echoes(clean, sparse, PAPER, clean, regional, 1e-12) - truth,
                                   0.0, atol=2e-4)


def test_resampled_noise_is_not_amplified_inside_the_measured_span():
    """Noise on the echoes comes out no larger than it went in, so the model sees data as clean as its own."""
    rng = np.random.default_rng(1)
    uneven = physics.Protocol.from_milliseconds([2.8, 5.1, 8.9, 12.2, 17.0, 21.1, 26.9, 31.0, 37.2, 42.5], 3.0)
    clean = np.log(physics.qbold_signal(1.0, np.full(2000, 15.0), 0.6, 0.03, -0.03, uneven))
    noisy = clean + rng.normal(0.0, 0.01, clean.shape)
    smooth = np.repeat(clean[:1], len(clean), axis=0)  # what spatial smoothing gives in uniform tissue
    error = (decay.resample_log_echoes(noisy, uneven, PAPER, smooth)
             - decay.resample_log_echoes(clean, uneven, PAPER, smooth))
    assert error.std(axis=0).max() < 0.011


def test_a_resampling_model_reads_a_late_first_echo_and_refuses_echoes_that_start_later_or_stop_short():
    """The bundled default reads echoes that start by 8.5 ms and reach 39 ms in 3 T-equivalent time (its span
    4.5-39.5 ms, continued 4 ms before the first echo and 0.5 ms after the last); others are refused in one line
    that says where the echoes must start and end."""
    bundled = models.load_bundle(None).protocol_range
    for te_ms, b0 in (([3.5 + 4.1 * i for i in range(12)], 3.0), ([2.0 + 2.6 * i for i in range(16)], 2.89),
                      ([1.8 + 1.6 * i for i in range(12)], 7.0), ([2.5 + 2.1 * i for i in range(10)], 7.0),
                      ([8.0 + 4.5 * i for i in range(8)], 3.0)):
        assert bundled.problems(physics.Protocol.from_milliseconds(te_ms, b0)) == []
    for te_ms, b0, what in (([2.2 + 3.1 * i for i in range(6)], 3.0, "covering 2.2-17.7 ms"),
                            ([4.0 + 1.9 * i for i in range(10)], 7.0, "covering 9.33-49.2 ms"),
                            ([5.0 + 7.0 * i for i in range(8)], 1.5, "covering 2.5-27 ms")):
        with pytest.raises(InputError) as err:
            bundled.check(physics.Protocol.from_milliseconds(te_ms, b0), "oef_context.keras")
        message = str(err.value)
        assert what in message and "--method cat" in message and "\n" not in message
        assert "in 3 T-equivalent time (TE x B0 / 3) starting by 8.5 ms and reaching 39 ms, at most 9 ms apart" in message


def test_the_default_model_refuses_echoes_too_far_apart_for_it():
    """Sparse trains are read too high, more so when the decay is also continued, so the bundled default bounds
    the widest gap between echoes plus the ms continued beyond them at 9 ms (3 T-equivalent): 6 echoes 7.86 ms
    apart (3.6 T) run, the same 7 ms apart from 7 ms (2.5 ms continued) and 7 T echoes 4 ms apart (9.33 ms,
    3 T-equivalent) do not; a card without the bound (the 4.5-22 ms network's) has none."""
    bundled = models.load_bundle(None).protocol_range
    assert bundled.max_gap_ms == 9.0
    assert bundled.problems(physics.Protocol.from_milliseconds([3.5 + 6.55 * i for i in range(6)], 3.6)) == []
    assert bundled.problems(physics.Protocol.from_milliseconds([7.0 + 7.0 * i for i in range(6)], 3.0)) == [
        "echoes up to 7 ms apart in 3 T-equivalent time with 2.5 ms continued"]
    assert bundled.problems(physics.Protocol.from_milliseconds([2.0 + 4.0 * i for i in range(8)], 7.0)) == [
        "echoes up to 9.33 ms apart in 3 T-equivalent time with 0.167 ms continued"]
    assert decay.ProtocolRange.from_dict(bundled.to_dict()) == bundled  # the card's dict and back
    unbounded = dataclasses.replace(bundled, max_gap_ms=None)
    assert unbounded.problems(physics.Protocol.from_milliseconds([2.0 + 4.0 * i for i in range(8)], 7.0)) == []
