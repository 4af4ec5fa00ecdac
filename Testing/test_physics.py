"""The QQ forward model against reference values computed independently from the published equations."""
import numpy as np
import pytest

from OEFPredictorLib import physics

FS_REFERENCE = {0.5: 0.074336, 1: 0.289616, 2: 1.048361, 3: 2.035395, 5: 4.040906, 10: 9.014820}

# (R2, Y, v, chi_nb) -> OEF, dw (rad/s), QSM (ppm), S at echoes 1..8 (S0 = 1, default protocol)
CASES = {
    "GM": ((14, 0.58, 0.035, -0.03), 0.408, 115.2, -0.0166,
           [.9363, .8650, .7948, .7278, .6651, .6074, .5549, .5071]),
    "WM": ((17, 0.58, 0.025, -0.04), 0.408, 117.9, -0.0301,
           [.9244, .8432, .7662, .6944, .6284, .5686, .5145, .4658]),
    "GM high OEF": ((14, 0.392, 0.035, -0.03), 0.600, 176.1, -0.0091,
                    [.9329, .8524, .7723, .6978, .6308, .5706, .5161, .4667]),
    "low OEF core": ((12, 0.833, 0.02, -0.02), 0.150, 30.5, -0.0184,
                     [.9473, .8918, .8393, .7897, .7428, .6986, .6568, .6174]),
}


@pytest.mark.parametrize("x, expected", FS_REFERENCE.items())
def test_fs_reference_values(x, expected):
    assert physics.fs(x) == pytest.approx(expected, abs=1e-5)


def test_fs_matches_hypergeometric_form_everywhere():
    mpmath = pytest.importorskip("mpmath")
    xs = np.concatenate([np.linspace(0, 8, 161), np.linspace(8, 120, 57), [3.7, 3.72, 250.0]])
    exact = np.array([float(mpmath.hyp1f2(-0.5, 0.75, 1.25, -9 * x * x / 16) - 1) for x in xs])
    assert np.max(np.abs(physics.fs(xs) - exact)) < 1e-6


def test_fs_is_even_and_has_the_small_and_large_x_limits():
    x = np.array([0.01, 0.05, 0.1])
    np.testing.assert_allclose(physics.fs(-x), physics.fs(x))
    np.testing.assert_allclose(physics.fs(x), 0.3 * x**2 - (3 / 280) * x**4, rtol=1e-5, atol=1e-9)
    assert physics.fs(1000.0) == pytest.approx(999.0)


def test_fs_derivative_matches_finite_differences():
    x = np.array([-7.0, -0.3, 0.2, 1.0, 3.7, 12.0, 55.0])
    h = 1e-4
    numeric = (physics.fs(x + h) - physics.fs(x - h)) / (2 * h)
    np.testing.assert_allclose(physics.fs_derivative(x), numeric, atol=2e-5)


@pytest.mark.parametrize("name", CASES)
def test_reference_cases(name):
    (R2, Y, v, chi_nb), oef, dw, qsm, signal = CASES[name]
    protocol = physics.Protocol.default()
    assert physics.oef_from_Y(Y) == pytest.approx(oef, abs=1e-3)
    assert physics.frequency_shift(Y, chi_nb, 3.0) == pytest.approx(dw, abs=0.05)
    assert physics.qsm_value(Y, v, chi_nb) == pytest.approx(qsm, abs=1e-4)
    np.testing.assert_allclose(physics.qbold_signal(1.0, R2, Y, v, chi_nb, protocol), signal, atol=1e-4)


def test_constants():
    assert physics.CHI_BA == pytest.approx(-0.10819, abs=1e-5)
    assert physics.PSI_HB == pytest.approx(0.09092, abs=1e-5)
    assert physics.DCHI0 == pytest.approx(3.393, abs=1e-3)
    assert physics.GAMMA * 3.0 * 1e-6 == pytest.approx(802.5, abs=0.1)


def test_signal_is_vectorised_over_any_shape_and_scales_with_S0():
    protocol = physics.Protocol.default()
    shape = (3, 4, 5)
    rng = np.random.default_rng(0)
    R2, Y = rng.uniform(10, 20, shape), rng.uniform(0.4, 0.8, shape)
    s1 = physics.qbold_signal(np.ones(shape), R2, Y, 0.03, -0.03, protocol)
    s2 = physics.qbold_signal(2 * np.ones(shape), R2, Y, 0.03, -0.03, protocol)
    assert s1.shape == shape + (8,)
    np.testing.assert_allclose(s2, 2 * s1)
    i = (1, 2, 3)
    np.testing.assert_allclose(s1[i], physics.qbold_signal(1.0, R2[i], Y[i], 0.03, -0.03, protocol))


def test_field_strength_scales_the_frequency():
    assert physics.frequency_shift(0.6, -0.03, 7.0) == pytest.approx(
        physics.frequency_shift(0.6, -0.03, 3.0) * 7 / 3)


def test_gradient_factor_is_one_without_gradient_and_decays_with_it():
    protocol = physics.Protocol.default()
    np.testing.assert_allclose(physics.gradient_factor(0.0, 2.0, protocol), 1.0)
    g = physics.gradient_factor(20.0, 2.0, protocol)
    assert np.all(np.diff(g) < 0) and g[0] < 1


def test_cmro2_and_clamping():
    assert physics.cmro2(50.0, 0.4) == pytest.approx(50 * 0.4 * 7.377)
    clamped = physics.clamp_to_bounds({"Y": np.array([-1.0, 0.5, 2.0]), "S0": np.array([0.1, 900.0])},
                                      s0_scale=np.array([100.0, 100.0]))
    np.testing.assert_allclose(clamped["Y"], [0.01, 0.5, 0.98])
    np.testing.assert_allclose(clamped["S0"], [50.0, 250.0])


def test_protocol_validation_messages():
    p = physics.Protocol.default()
    assert p.n_echoes == 8 and p.echo_times_ms[0] == 4.5 and p.echo_times_ms[-1] == 39.5
    with pytest.raises(ValueError, match="milliseconds"):
        physics.Protocol((4.5, 9.5))
    with pytest.raises(ValueError, match="increasing"):
        physics.Protocol((0.01, 0.005))
    with pytest.raises(ValueError, match="positive"):
        physics.Protocol((-0.001, 0.005))
    assert p.matches(physics.Protocol.from_milliseconds(p.echo_times_ms))
    assert not p.matches(physics.Protocol.from_milliseconds([t + 1 for t in p.echo_times_ms]))
    assert physics.Protocol.from_dict(p.to_dict()) == p
