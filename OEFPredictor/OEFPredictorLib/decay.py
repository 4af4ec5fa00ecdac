"""A protocol-free description of the mGRE decay, so that one model serves any common echo protocol and
field strength (docs/design/protocols.md).

Two facts of the QQ model make this possible:

- Field strength. The qBOLD term is exp(-v fs(dw t)) with dw proportional to B0, so a B0 acquisition
  at echo time t dephases exactly like a 3 T one at the *3 T-equivalent time* tau = t B0 / 3. R2 is a
  rate in real time; in 3 T-equivalent time it reads as R2 * 3 / B0 (`R2_3T_EQUIVALENT`). The network
  therefore sees curves in tau and predicts R2 in 3 T-equivalent units; decode multiplies back by B0/3.
- Echo times. Per voxel, the log magnitude over tau is fitted (ridge least squares) by a small basis
  that spans the qBOLD curves of every plausible tissue: 1, tau and fs(w tau) for a few w (`OMEGAS`;
  checked to reproduce noise-free qBOLD curves within 0.005 in log signal for any supported protocol).
  The fitted curve, read at fixed *canonical* times (`CANONICAL_MS`) relative to its value at the first
  echo, is the network's input: the same numbers whatever the echoes were. A canonical time outside
  the measured span is read at the nearest measured end (no extrapolation), and the span itself is
  given to the network (`protocol_descriptors`), so it knows which part of the curve it saw.

The map from log echoes to canonical values is one (K, E) matrix per protocol (`canonical_matrix`):
linear, so averaging it over neighbourhoods (the context pyramid) equals fitting averaged data.

A model trained on one protocol (the default context model) reads other echo trains by resampling their
decay to its own echo times (`resample_echoes`): the basis fit, corrected by each voxel's best qBOLD curve
so that it is exact on QQ-model data (that curve's dw drawn towards its region's where noise leaves it free),
with R2 scaled back to real time (`r2_factor_after_resampling`).
Beyond the echoes it continues each voxel's qBOLD curve, but only so far (`ProtocolRange.extrapolation_ms`): a
first echo up to 4 ms late (3 T-equivalent; at 3 T every supported first echo, up to 8 ms), a last echo 0.5 ms
short of the paper-protocol network's 39.5 ms. Before the dw prior below, a continued decay biased the map by 3
points for a first echo 1.5 ms late (echo 1 normalises all the others); with it, 0.8-1.8 points for 1-3.5 ms
at SNR 100 (benchmarks/sparse_trains.py --trains late), and the interval widens with the distance
(spatial.noise_scale).
Echo trains that stop short of 39 ms go to a network bound to 4.5-22 ms (1.5 T trains and shorter 3 T ones),
trained on other echo trains resampled to it, which continues the decay up to 4 ms past the last echo; the
engine runs the first bundled model that reads the data (predict.bundled_for_protocol). Trains that start
later than 8.5 ms or end before 18 ms (3 T-equivalent: at 7 T a first echo after 3.64 ms; at 1.5 T a last before
36 ms) are refused: a network bound to 8-18 ms did no better than a constant guess (docs/design/protocols.md).

QSM reference: QSM pipelines reference susceptibility to CSF, to the whole brain or to nothing, which
leaves a constant offset of a few hundredths of a ppm. In the QQ model such an offset carries almost no
OEF information (dQSM/dY is about -0.044 ppm per unit Y at v = 3 %), so the model reads QSM relative to
the brain's own CSF (`qsm_reference`): the median QSM of the slowest-decaying `CSF_SHARE` of the mask,
where the ventricles are (CSF has almost no blood and R2 of a few Hz). A constant offset then does not
change the map, and the susceptibility scale stays the one the QQ model's constants assume (water = 0).
A mask without CSF (the slowest voxels decay like tissue) falls back to the brain median, shifted by
the population's median brain-to-CSF difference, with a warning.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from . import physics
from .errors import InputError

REFERENCE_FIELD_T = 3.0
OMEGAS = (50.0, 100.0, 200.0)  # rad/s in 3 T-equivalent time: dw spans ~30-250 rad/s at 3 T
RIDGE = 1e-3  # on the fs columns (normalised), so short spans stay well-posed
CANONICAL_MS = (3.0, 6.0, 9.0, 13.0, 18.0, 24.0, 31.0, 40.0, 52.0, 70.0)  # 3 T-equivalent
N_DESCRIPTORS = 3  # protocol_descriptors


# How far a model's span may lie beyond the echoes (3 T-equivalent ms; the card's `extrapolation_ms`, before
# the first echo and after the last). There the decay is continued by each voxel's qBOLD fit
# (resample_log_echoes). Echo 1 normalises every other echo, so a late first echo moves the whole input: on
# development patients (benchmarks/sparse_trains.py --trains late) a first echo 1-3.5 ms late read OEF 0.8-1.8
# points high at SNR 100 (the own protocol: 0.2), and the interval widens with the distance
# (spatial.noise_scale). 4 ms takes every supported 3 T train (first echo up to 8 ms). After the last echo the
# paper-protocol network continues 0.5 ms; the card of a network that stands in for shorter trains may allow more.
# Sparse echo trains are read too high (the resampling's correction leans on a dw that few, noisy echoes leave
# loose), and more so when the decay is also continued: on development patients 6 echoes 7 ms apart starting
# 2.5 ms late read OEF 4 points high at SNR 40-100, 7 T trains 9.3-14 ms apart (3 T-equivalent) 4-8 points, while
# the interval held 66-89 %. So a card may bound the widest gap plus the ms continued (`max_gap_ms`; the
# paper-protocol network: 9 ms, its own gap and the continuation budget).
MAX_LATE_FIRST_ECHO_MS = 4.0
LAST_ECHO_TOLERANCE_MS = 0.5
LATE_FIRST_ECHO_NOTICE_MS = 0.5  # later than this, the engine says so (predict.Predictor.caveats)


@dataclasses.dataclass(frozen=True)
class ProtocolRange:
    """The echo protocols a model supports (the card's `supported_protocols`)."""

    echoes: tuple[int, int] = (5, 16)
    first_echo_ms: tuple[float, float] = (1.5, 8.0)
    spacing_ms: tuple[float, float] = (1.5, 8.0)
    last_echo_ms: tuple[float, float] = (15.0, 60.0)
    field_strength_T: tuple[float, float] = (1.5, 7.0)
    # the 3 T-equivalent span (ms) of a model that resamples other protocols to its own echo times
    # (resample_echoes): continuing a noisy decay far beyond the data biases it
    spans_ms: tuple[float, float] | None = None
    # how far that span may lie beyond the echoes (before the first, after the last): continued by the decay fit
    extrapolation_ms: tuple[float, float] = (MAX_LATE_FIRST_ECHO_MS, LAST_ECHO_TOLERANCE_MS)
    # the widest gap between echoes plus the ms continued beyond them (3 T-equivalent) that such a model reads;
    # None: no limit
    max_gap_ms: float | None = None

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, d: dict) -> "ProtocolRange":
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()
                      if k in {f.name for f in dataclasses.fields(cls)}})

    def describe(self) -> str:
        return (f"{self.echoes[0]}-{self.echoes[1]} echoes, first echo {self.first_echo_ms[0]:g}-"
                f"{self.first_echo_ms[1]:g} ms, spacing {self.spacing_ms[0]:g}-{self.spacing_ms[1]:g} ms, last echo "
                f"{self.last_echo_ms[0]:g}-{self.last_echo_ms[1]:g} ms, {self.field_strength_T[0]:g}-"
                f"{self.field_strength_T[1]:g} T" + (f", echoes in 3 T-equivalent time (TE x B0 / 3) {self.reach()}"
                                                     if self.spans_ms else ""))

    def reach_ms(self) -> tuple[float, float]:
        """For a model bound to `spans_ms`: the latest first echo and the earliest last echo it reads (3 T-
        equivalent ms), its span less what it may continue beyond the echoes."""
        return self.spans_ms[0] + self.extrapolation_ms[0], self.spans_ms[1] - self.extrapolation_ms[1]

    def reach(self) -> str:
        """Where the echoes must start and end (3 T-equivalent ms) for a model bound to `spans_ms`, and how far
        apart they may lie."""
        start_by, reaching = self.reach_ms()
        return (f"starting by {start_by:g} ms and reaching {reaching:g} ms"
                + (f", at most {self.max_gap_ms:g} ms apart less any ms continued before the first or after the last"
                   if self.max_gap_ms else ""))

    def problems(self, protocol: physics.Protocol) -> list[str]:
        """What puts the protocol outside the range (empty: supported). A 1 % tolerance on each limit."""
        te = np.asarray(protocol.echo_times_ms)
        spacing = np.diff(te)
        out = []

        def outside(value, lo_hi):
            return value < lo_hi[0] * 0.99 or value > lo_hi[1] * 1.01

        if not self.echoes[0] <= len(te) <= self.echoes[1]:
            out.append(f"{len(te)} echoes")
        if outside(te[0], self.first_echo_ms):
            out.append(f"first echo {te[0]:g} ms")
        if outside(spacing.min(), self.spacing_ms) or outside(spacing.max(), self.spacing_ms):
            out.append(f"echo spacing {spacing.min():.3g}-{spacing.max():.3g} ms")
        if outside(te[-1], self.last_echo_ms):
            out.append(f"last echo {te[-1]:g} ms")
        if outside(protocol.field_strength, self.field_strength_T):
            out.append(f"{protocol.field_strength:g} T")
        if self.spans_ms:
            tau_ms = equivalent_times(protocol) * 1000.0
            before, after = continued_ms(tau_ms, self.spans_ms)
            if before > self.extrapolation_ms[0] or after > self.extrapolation_ms[1]:
                out.append(f"echoes covering {tau_ms[0]:.3g}-{tau_ms[-1]:.3g} ms in 3 T-equivalent time")
            widest = np.diff(tau_ms).max()
            if self.max_gap_ms and widest + before + after > self.max_gap_ms * 1.01:
                out.append(f"echoes up to {widest:.3g} ms apart in 3 T-equivalent time"
                           + (f" with {before + after:.3g} ms continued" if before + after > 0.05 else ""))
        return out

    def check(self, protocol: physics.Protocol, model_name: str) -> None:
        problems = self.problems(protocol)
        if problems:
            raise InputError(f"The model {model_name} supports {self.describe()}; these data have "
                             f"{', '.join(problems)}. Use --method cat (needs no trained model), or train a model "
                             "for this protocol (oefpredictor train).")


SUPPORTED = ProtocolRange()


def continued_ms(tau_ms: np.ndarray, span_ms) -> tuple[float, float]:
    """How far a span (first, last time) lies beyond echoes at tau_ms (all 3 T-equivalent ms): before the first
    echo and after the last, what resampling to that span continues beyond the data (0 where it does not)."""
    return max(0.0, float(tau_ms[0] - span_ms[0])), max(0.0, float(span_ms[-1] - tau_ms[-1]))


def extrapolated_ms(source: physics.Protocol, target: physics.Protocol) -> float:
    """How far (3 T-equivalent ms) the target's echoes lie beyond the source's, before the first plus after
    the last: what resampling the source's decay to the target's echo times continues beyond the data."""
    return sum(continued_ms(equivalent_times(source) * 1000.0, equivalent_times(target)[[0, -1]] * 1000.0))


@dataclasses.dataclass(frozen=True)
class Resampling:
    """How a volume's decay was carried to a model's echo times, which its interval widens with (the card's
    interval_scale.noise; spatial.noise_scale): whether it was resampled from another echo train at all, how far
    the decay was continued beyond the echoes, and how much wider the widest gap between echoes is than the
    model's own (3 T-equivalent ms): the resampling interpolates across that gap."""

    resampled: bool = False
    extrapolated_ms: float = 0.0
    wider_gap_ms: float = 0.0

    @classmethod
    def between(cls, source: physics.Protocol, target: physics.Protocol) -> "Resampling":
        if source.matches(target):
            return cls()
        gap = np.diff(equivalent_times(source)).max() - np.diff(equivalent_times(target)).max()
        return cls(True, extrapolated_ms(source, target), max(0.0, 1000.0 * float(gap)))

    def covariates(self) -> dict[str, float]:
        """Per term of the interval's scale (named as the card names its coefficient), this volume's value."""
        return {"resampled": float(self.resampled), "extrapolated_per_ms": self.extrapolated_ms,
                "wider_gap_per_ms": self.wider_gap_ms}


def spec() -> dict:
    """The representation as a model card records it; a model made with another one is refused."""
    return {"omegas_rad_s": list(OMEGAS), "ridge": RIDGE, "canonical_ms": list(CANONICAL_MS),
            "reference_field_T": REFERENCE_FIELD_T, "qsm_reference": f"CSF: median of the slowest-decaying {CSF_SHARE:.0%} of the mask"}


def check_spec(recorded: dict) -> None:
    if recorded != spec():
        raise InputError("The model was made with another decay representation than this version of OEFPredictor "
                         "uses; use the OEFPredictor version it was trained with, or retrain it.")


def equivalent_times(protocol: physics.Protocol) -> np.ndarray:
    """The echo times (s) at which a 3 T acquisition dephases as this one does: t * B0 / 3."""
    return protocol.te * (protocol.field_strength / REFERENCE_FIELD_T)


def r2_3t_equivalent_factor(protocol: physics.Protocol) -> float:
    """R2 (real time) x this = R2 in 3 T-equivalent time (what the network predicts)."""
    return REFERENCE_FIELD_T / protocol.field_strength


def _basis(tau: np.ndarray) -> np.ndarray:
    return np.stack([np.ones_like(tau), tau] + [physics.fs(w * tau) for w in OMEGAS], axis=-1)


def _fit_matrix(tau: np.ndarray) -> np.ndarray:
    """(P, E): the basis coefficients of the ridge fit to log echoes measured at tau."""
    a = _basis(tau)
    norms = np.linalg.norm(a, axis=0)
    an = a / norms
    penalty = np.diag([0.0, 0.0] + [RIDGE] * len(OMEGAS))
    return np.linalg.solve(an.T @ an + penalty, an.T) / norms[:, None]


def canonical_matrix(protocol: physics.Protocol) -> np.ndarray:
    """(K, E) matrix W: log echoes (E) -> the fitted curve at the canonical times relative to its value
    at the first echo (K). Rows sum to 0, so any per-voxel scale of the echoes cancels."""
    tau = equivalent_times(protocol)
    fit = _fit_matrix(tau)
    at = np.clip(np.asarray(CANONICAL_MS) / 1000.0, tau[0], tau[-1])
    return ((_basis(at) - _basis(tau[:1])) @ fit).astype(np.float32)


def protocol_descriptors(protocol: physics.Protocol) -> np.ndarray:
    """What the network is told of the acquisition: the 3 T-equivalent span of the echoes (first and last,
    in units of 10 ms) and the echo count / 10."""
    tau_ms = equivalent_times(protocol) * 1000.0
    return np.array([tau_ms[0] / 10.0, tau_ms[-1] / 10.0, protocol.n_echoes / 10.0], dtype=np.float32)


NOISE_SAMPLE = 200_000  # voxels noise_level reads at most (evenly spaced)


def noise_level(echo_rows: np.ndarray, protocol: physics.Protocol) -> float:
    """The data's noise relative to the signal: log10 of the brain median of each voxel's RMS residual
    about the basis fit of its log decay, taken back to magnitude relative to echo 1 (residual x S_j / S_1)
    and per degree of freedom: about log10(1 / SNR) for any echo train. Along the echoes, so tissue
    texture does not enter; the basis misfit of noise-free QQ decays is far below real noise."""
    if len(echo_rows) == 0:
        return float("nan")
    tau = equivalent_times(protocol)
    step = max(1, len(echo_rows) // NOISE_SAMPLE)  # a median needs no more: bounded time and memory
    rows = np.maximum(echo_rows[::step].astype(np.float64), np.finfo(np.float32).tiny)
    logs = np.log(rows)
    residual = (logs - logs @ (_basis(tau) @ _fit_matrix(tau)).T) * rows / rows[:, :1]
    dof = max(protocol.n_echoes - 2 - len(OMEGAS), 1)
    return float(np.log10(np.median(np.sqrt((residual ** 2).sum(axis=1) / dof))))


# --- Resampling a decay to another protocol (for models trained on one protocol) -----------------
CHORD_S = 0.010  # 3 T-equivalent span over which the fitted curve's end slopes are taken
DW_GRID = np.geomspace(20.0, 400.0, 48)  # rad/s in 3 T-equivalent time (Y 0.3-0.9, chi_nb +-0.1: 30-230)
FIT_SMOOTHING_MM = 2.0  # Gaussian sigma of the log echoes the qBOLD fit reads (the correction is smooth)
# The correction's dw, from noisy data, is pulled towards the dw of the voxel's region (log echoes smoothed over
# REGIONAL_SMOOTHING_MM) as far as the data leave it free: a point estimate of dw from a few far-apart echoes is
# biased by noise, and the correction of a sparse train depends strongly on dw (see resample_log_echoes).
REGIONAL_SMOOTHING_MM = 10.0
DW_PRIOR_LOG_SD = 0.3  # the spread of a voxel's dw about its region's (natural log): tissue and lesions differ
RESAMPLE_CHUNK = 65536  # voxels per step (bounds the (voxels, DW_GRID) residual table)


def resampling_matrix(source: physics.Protocol, target: physics.Protocol) -> np.ndarray:
    """(E_target, E_source) matrix: log echoes measured with `source` -> the basis fit read at the target's
    3 T-equivalent times. Beyond the measured span the fit is continued along its chord over the last (or
    first) CHORD_S of the span: the qBOLD log decay is nearly linear at long times, and a straight
    continuation amplifies noise far less than the basis would (noise gain 3.4 instead of 12 for 6 echoes
    ending at 17.7 ms read up to 39.5 ms)."""
    tau, at = equivalent_times(source), equivalent_times(target)
    fit = _fit_matrix(tau)
    inside = _basis(np.clip(at, tau[0], tau[-1])) @ fit
    end = min(CHORD_S, tau[-1] - tau[0])
    late = (_basis(tau[-1:]) - _basis(tau[-1:] - end)) @ fit / end
    early = (_basis(tau[:1] + end) - _basis(tau[:1])) @ fit / end
    beyond = np.clip(at - tau[-1], 0.0, None)[:, None]
    before = np.clip(at - tau[0], None, 0.0)[:, None]
    return inside + beyond * late + before * early


def _qbold_design(tau: np.ndarray, dw: np.ndarray) -> np.ndarray:
    """(N, T, 3): the log qBOLD curve a - R2 tau - v fs(dw tau) is linear in (a, R2, v) for each dw."""
    n = len(dw)
    return np.stack([np.ones((n, len(tau))), -np.broadcast_to(tau, (n, len(tau))),
                     -physics.fs(dw[:, None] * tau[None, :])], axis=-1)


def best_dw(logs: np.ndarray, tau: np.ndarray, prior_dw: np.ndarray | None = None,
            noise_var: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per row of log echoes at tau: the dw (N,) of the best log qBOLD curve, and that curve's residual sum of
    squares at the nearest grid dw (N,). Variable projection: linear least squares for every dw of DW_GRID,
    the best dw refined by a parabola in log dw. No iteration, so no voxel fails to converge.
    With `prior_dw` (N,) and `noise_var` (the rows' noise variance per echo), dw minimises the residual /
    noise_var plus ((log dw - log prior_dw) / DW_PRIOR_LOG_SD)^2: where the residual barely tells one dw from
    another (noisy, few echoes), dw stays near the prior; where it does, the data decide."""
    # residual of each dw's fit = |y|^2 - |Q^T y|^2 with Q an orthonormal basis of that dw's design: one
    # matrix product for the whole grid
    q = np.concatenate([np.linalg.qr(a)[0] for a in _qbold_design(tau, DW_GRID)], axis=1)  # (E, 3 K)
    projected = (logs @ q).reshape(len(logs), len(DW_GRID), 3)
    residuals = np.einsum("ne,ne->n", logs, logs)[:, None] - np.einsum("nkj,nkj->nk", projected, projected)
    least = residuals.min(axis=1)
    if prior_dw is not None:
        residuals = (residuals / noise_var
                     + ((np.log(DW_GRID)[None, :] - np.log(prior_dw)[:, None]) / DW_PRIOR_LOG_SD) ** 2)
    k = np.clip(residuals.argmin(axis=1), 1, len(DW_GRID) - 2)
    r0, r1, r2 = (np.take_along_axis(residuals, (k + d)[:, None], axis=1)[:, 0] for d in (-1, 0, 1))
    curvature = r0 - 2.0 * r1 + r2
    shift = np.clip(np.where(curvature > 0, 0.5 * (r0 - r2) / np.where(curvature > 0, curvature, 1.0), 0.0), -1, 1)
    return DW_GRID[k] * (DW_GRID[1] / DW_GRID[0]) ** shift, least


def fit_log_qbold(logs: np.ndarray, tau: np.ndarray, prior_dw: np.ndarray | None = None,
                  noise_var: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per row of log echoes at tau: the best log qBOLD curve, as (a, R2, v) coefficients (N, 3) and dw (N,):
    best_dw (with its optional prior), then the coefficients at that dw."""
    dw = best_dw(logs, tau, prior_dw, noise_var)[0]
    a = _qbold_design(tau, dw)
    gram = np.einsum("nei,nej->nij", a, a)
    coef = np.linalg.solve(gram, np.einsum("nei,ne->ni", a, logs)[..., None])[..., 0]
    return coef, dw


def resample_log_echoes(logs: np.ndarray, source: physics.Protocol, target: physics.Protocol,
                        smoothed: np.ndarray | None = None, regional: np.ndarray | None = None,
                        noise_var: float | None = None) -> np.ndarray:
    """(N, E_source) log echoes -> (N, E_target): the linear resampling (resampling_matrix), whose noise gain
    is low, corrected by what that resampling gets wrong on the voxel's best qBOLD curve (fit_log_qbold),
    fitted to `smoothed` (the same voxels' spatially smoothed log echoes; default: `logs`). With `regional`
    (the same voxels' log echoes smoothed over a region) and `noise_var` (of `smoothed`, per echo), the
    curve's dw is drawn towards the region's best dw as far as the noise leaves it free.

    Why both: the trained network reads OEF from differences in the decay's curvature of about 0.001 in
    log signal, and the linear resampling alone is off by that much (a bias of 7 pp OEF on noise-free data);
    the qBOLD fit alone is exact on noise-free data but over-fits noise. The correction is the difference of
    two nearby curves, so it is exact where the voxel follows the QQ model, and fitted to smoothed data it
    hardly carries noise. But for echoes far apart (6 echoes 7.8 ms apart, 3 T-equivalent) the correction
    is large and depends strongly on dw, and dw fitted per voxel to noisy data is biased: the resampled
    curvature was off by about 0.001 on average and the map read OEF 6-8 points high at SNR 100-300, while
    noise-free it was right. The regional prior removes most of that (benchmarks/sparse_trains.py)."""
    m = resampling_matrix(source, target)
    tau, at = equivalent_times(source), equivalent_times(target)
    prior_dw = None
    if regional is not None and noise_var is not None:
        prior_dw = best_dw(regional, tau)[0]
    coef, dw = fit_log_qbold(logs if smoothed is None else smoothed, tau, prior_dw, noise_var)
    at_source = np.einsum("nei,ni->ne", _qbold_design(tau, dw), coef)
    at_target = np.einsum("nei,ni->ne", _qbold_design(at, dw), coef)
    return logs @ m.T + (at_target - at_source @ m.T)


def r2_factor_after_resampling(source: physics.Protocol, target: physics.Protocol) -> float:
    """Real R2 of the source data per R2 read from its decay resampled to the target protocol."""
    return source.field_strength / target.field_strength


def smoothed_noise_variance(smoothed: np.ndarray, protocol: physics.Protocol) -> float:
    """The noise variance per echo of smoothed log echoes (N, E): the brain median of the residual about each
    row's best qBOLD curve, per degree of freedom (the QQ curve fits noise-free decays almost exactly; a
    floor keeps noise-free data finite). From at most a chunk of evenly spaced rows: a median needs no more,
    and the fit's tables then take no more memory than one chunk of the resampling."""
    tau = equivalent_times(protocol)
    rows = smoothed[::max(1, -(-len(smoothed) // RESAMPLE_CHUNK))].astype(np.float64)
    if len(rows) == 0:
        return 1e-12
    dof = max(protocol.n_echoes - 4, 1)  # a, R2, v and dw
    return max(float(np.median(best_dw(rows, tau)[1])) / dof, 1e-12)


def resample_echoes(echoes: np.ndarray, mask: np.ndarray, source: physics.Protocol, target: physics.Protocol,
                    spacing_zyx=(2.0, 2.0, 2.0), check_cancel=None) -> np.ndarray:
    """(z, y, x, E_source) magnitudes -> (z, y, x, E_target) float32, resampled inside the mask (0 outside):
    resample_log_echoes, with the qBOLD fit on log echoes smoothed inside the mask (FIT_SMOOTHING_MM) and its
    dw drawn towards that of the log echoes smoothed over REGIONAL_SMOOTHING_MM."""
    from scipy import ndimage

    inside = mask.astype(np.float32)
    tiny = np.finfo(np.float32).tiny
    logs = np.empty((int(mask.sum()), echoes.shape[-1]), dtype=np.float32)
    smoothed, regional = np.empty_like(logs), np.empty_like(logs)
    weights = []
    for width, into in ((FIT_SMOOTHING_MM, smoothed), (REGIONAL_SMOOTHING_MM, regional)):
        sigma = [width / float(s) for s in spacing_zyx]
        weights.append((sigma, into, np.maximum(ndimage.gaussian_filter(inside, sigma, mode="constant"), 1e-3)[mask]))
    for e in range(echoes.shape[-1]):  # one echo at a time: no second full-size 4D volume
        log_echo = np.log(np.maximum(echoes[..., e].astype(np.float32), tiny)) * inside
        logs[:, e] = log_echo[mask]
        for sigma, into, weight in weights:
            into[:, e] = ndimage.gaussian_filter(log_echo, sigma, mode="constant")[mask] / weight
    noise_var = smoothed_noise_variance(smoothed, source)
    out = np.zeros(mask.shape + (target.n_echoes,), dtype=np.float32)
    resampled = np.empty((len(logs), target.n_echoes), dtype=np.float32)
    for start in range(0, len(logs), RESAMPLE_CHUNK):
        if check_cancel:
            check_cancel()
        rows = slice(start, start + RESAMPLE_CHUNK)
        values = resample_log_echoes(logs[rows].astype(np.float64), source, target, smoothed[rows].astype(np.float64),
                                     regional[rows].astype(np.float64), noise_var)
        resampled[rows] = np.exp(np.clip(values, -80.0, 80.0))  # no inf from a zero echo
    out[mask] = resampled
    return out


CSF_SHARE = 0.02  # the slowest-decaying share of the brain mask: CSF (~9 % of a brain mask) is in it
CSF_MAX_R2_HZ = 6.0  # 3 T-equivalent decay rate under which those voxels are CSF (tissue: > 10 Hz)
BRAIN_MINUS_CSF_PPM = -0.015  # median brain QSM relative to CSF in the population (the fallback)


def qsm_reference(first_echo: np.ndarray, last_echo: np.ndarray, qsm: np.ndarray,
                  protocol: physics.Protocol) -> tuple[float, str | None]:
    """The QSM value taken as zero, from the mask's voxels (flat arrays: first and last echo magnitude,
    QSM): the CSF's median QSM (see the module docstring); and a warning when the mask holds no CSF."""
    tau = equivalent_times(protocol)
    with np.errstate(divide="ignore", invalid="ignore"):
        rate = np.log(first_echo / last_echo) / (tau[-1] - tau[0])
    rate = np.where(np.isfinite(rate), rate, np.inf)
    n = max(1, int(round(CSF_SHARE * rate.size)))
    slowest = np.argpartition(rate, n - 1)[:n]
    if np.median(rate[slowest]) <= CSF_MAX_R2_HZ:
        return float(np.median(qsm[slowest])), None
    return float(np.median(qsm)) - BRAIN_MINUS_CSF_PPM, (
        "The mask holds no CSF (its slowest-decaying voxels decay like tissue), so QSM could not be referenced "
        "to CSF; the brain median was used, which moves the OEF level by a few points. Use a brain mask that "
        "includes the ventricles.")
