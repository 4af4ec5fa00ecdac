"""Classical QQ methods the LSTM is compared with: voxelwise NLLS, CAT and CCM (method.md).

All three work on echoes divided by each voxel's echo 1 (so S0 is fitted relative to echo 1 and
scaled back to the input's units at the end) and QSM in ppm.

- nlls: voxelwise QQ nonlinear least squares. Cost per voxel
      sum_j (s_j - m_j(theta))^2 / sigma_s^2 + (chi - q(theta))^2 / sigma_chi^2
  i.e. lam = (sigma_s / sigma_chi)^2 on the QSM term with both residuals noise-normalised.
  sigma_s (magnitude noise sd in the input's units) is estimated from the data when not given
  (estimate_noise_sigma: residual of a cubic-in-TE fit of each decay), and divided by each voxel's
  echo 1 because the fit is on normalised echoes. sigma_chi defaults to 2 ppb (the data sets'
  default QSM noise). Solver: batched projected Levenberg-Marquardt in numpy with analytic
  Jacobians (physics.fs_derivative), bounds by projection with an active set (parameters pinned
  at a bound whose gradient points outward are frozen for that step), multi-start over
  Y0 in {0.4, 0.55, 0.7, 0.85}, lowest cost kept. Rician bias is not modelled.
- cat: cluster analysis of time evolution (Cho 2020): k-means on the normalised decays + QSM,
  K by BIC, NLLS on each cluster mean, then a few voxelwise LM iterations from the cluster values.
- ccm: cluster-based classification and matching (Lee 2020): a database of simulated normalised
  decays + QSM from sampled parameter tuples, k-means clusters, nearest centroid, then the k
  nearest members of that cluster, inverse-distance-weighted parameters.

Entry point for the engine: predict_voxels(method, echoes (N, E), qsm (N,), protocol, ...).
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from . import physics
from .errors import CancelledError, InputError

METHODS = ("nlls", "cat", "ccm")
METHOD_LABELS = {"nlls": "voxelwise QQ NLLS", "cat": "CAT (Cho 2020)", "ccm": "CCM (Lee 2020)"}
NAMES = physics.PARAMETER_NAMES
Y_STARTS = (0.4, 0.55, 0.7, 0.85)
V0 = 0.03
DEFAULT_QSM_SIGMA_PPM = 0.002
MIN_RELATIVE_SIGMA = 1e-3  # floor for noise-free data: treat as SNR 1000
MIN_QSM_SIGMA_PPM = 0.0005
# CAT's voxelwise refinement: a few damped LM steps from the cluster values. Undamped or long
# refinement walks each voxel to its own noisy minimum, i.e. back to plain NLLS (at SNR 100 the
# OEF RMSE went 6.8 -> 7.9 -> 17 -> 28 pp for 0 / 3 / 10 / 30 steps on a simulated test patient).
CAT_REFINE_ITERATIONS = 3
CAT_REFINE_DAMPING = 1.0
CCM_NEIGHBOURS = 32  # members averaged per voxel: the noise ball holds many database entries
CCM_CLUSTERS = 64

_LO = np.array([physics.BOUNDS[n][0] for n in NAMES])
_HI = np.array([physics.BOUNDS[n][1] for n in NAMES])
_DQDY_BLOOD = physics.PSI_HB * physics.DCHI_HB  # -d(blood chi)/dY
_BLOOD_OFFSET = physics.CHI_BA / physics.ALPHA + _DQDY_BLOOD * (1.0 - (1.0 - physics.ALPHA) * physics.YA) / physics.ALPHA


# --- Fast fs lookup ---------------------------------------------------------------------------------
_FS_STEP = 1e-3
_FS_MAX = 400.0


@functools.lru_cache(maxsize=1)
def _fs_lookup():
    """physics.fs and physics.fs_derivative sampled once on a uniform grid, with slopes: a lookup by
    index is several times faster than np.interp's binary search, which dominated the fit's time."""
    grid = np.arange(0.0, _FS_MAX + _FS_STEP / 2, _FS_STEP)
    f, d = physics.fs(grid), physics.fs_derivative(grid)
    return f, np.append(np.diff(f), 0.0), d, np.append(np.diff(d), 0.0)


def fs_and_derivative(x: np.ndarray):
    """fs(x) and fs'(x) by linear interpolation on physics' own values (same accuracy, ~1e-7)."""
    f, df, d, dd = _fs_lookup()
    xa = np.minimum(np.abs(x), _FS_MAX) * (1.0 / _FS_STEP)
    i = xa.astype(np.intp)
    frac = xa - i
    fx = f[i] + frac * df[i]
    dx = d[i] + frac * dd[i]
    far = np.abs(x) > _FS_MAX  # beyond the table: the asymptote x - 1 (as physics.fs)
    if far.any():
        fx = np.where(far, np.abs(x) - 1.0, fx)
        dx = np.where(far, 1.0, dx)
    return fx, np.copysign(dx, x)


# --- The QQ model on normalised echoes, with its Jacobian ---------------------------------------
def residuals_and_jacobian(p, s, chi, w_s, w_q, protocol: physics.Protocol, jacobian: bool = True):
    """Noise-weighted residuals r (M, E+1) of p = (S0, R2, Y, v, chi_nb) (M, 5) and their Jacobian.

    r[:, :E] = (m(p) - s) w_s, r[:, E] = (q(p) - chi) w_q, with m the QQ echoes and q the QSM
    model. J has shape (5, M, E+1), parameter-major, so each parameter's block is contiguous.
    """
    te = protocol.te
    E = te.size
    S0, R2, Y, v, chi_nb = (p[:, i] for i in range(5))
    c = physics.GAMMA * protocol.field_strength * 1e-6 / 3.0
    dw = physics.frequency_shift(Y, chi_nb, protocol.field_strength)
    f, fd = fs_and_derivative(dw[:, None] * te)
    decay = np.exp(-R2[:, None] * te - v[:, None] * f)
    blood = _BLOOD_OFFSET - _DQDY_BLOOD * Y
    q = blood * v + (1.0 - v / physics.ALPHA) * chi_nb
    ws = w_s[:, None]
    r = np.empty((len(p), E + 1))
    r[:, :E] = (S0[:, None] * decay - s) * ws
    r[:, E] = (q - chi) * w_q
    if not jacobian:
        return r, None
    J = np.empty((5, len(p), E + 1))
    J[0, :, :E] = decay * ws
    ms = J[0, :, :E] * S0[:, None]
    J[1, :, :E] = -te * ms
    d_dw = -v[:, None] * te * fd * ms  # d r / d dw
    J[2, :, :E] = d_dw * (-c * physics.HCT * physics.DCHI0)
    J[3, :, :E] = -f * ms
    J[4, :, :E] = d_dw * (-c)
    J[0, :, E] = 0.0
    J[1, :, E] = 0.0
    J[2, :, E] = -_DQDY_BLOOD * v * w_q
    J[3, :, E] = (blood - chi_nb / physics.ALPHA) * w_q
    J[4, :, E] = (1.0 - v / physics.ALPHA) * w_q
    return r, J


def _solve_spd(A, g):
    """Solve A x = g for a batch of symmetric positive definite 5x5 systems, A (5, 5, M), g (5, M),
    by an unrolled Cholesky (np.linalg.solve's per-matrix overhead dominated the fit)."""
    n = A.shape[0]
    L = np.zeros_like(A)
    for j in range(n):
        d = A[j, j] - sum(L[j, k] ** 2 for k in range(j))
        L[j, j] = np.sqrt(np.maximum(d, 1e-12))
        for i in range(j + 1, n):
            L[i, j] = (A[i, j] - sum(L[i, k] * L[j, k] for k in range(j))) / L[j, j]
    y = np.empty_like(g)
    for i in range(n):
        y[i] = (g[i] - sum(L[i, k] * y[k] for k in range(i))) / L[i, i]
    x = np.empty_like(g)
    for i in reversed(range(n)):
        x[i] = (y[i] - sum(L[k, i] * x[k] for k in range(i + 1, n))) / L[i, i]
    return x


def levenberg_marquardt(p0, s, chi, w_s, w_q, protocol, max_iter=60, tol=1e-7, mu0=1e-3):
    """Batched projected Levenberg-Marquardt within physics.BOUNDS; returns (p (M, 5), cost (M,)).

    Marquardt damping on the Jacobi-scaled normal equations, one damping factor per voxel. Bounds
    by projection with an active set: a parameter at a bound whose descent direction points
    outside is frozen for that step. Voxels stop when an accepted step lowers the cost by less
    than tol (relative) or the damping blows up; the active set shrinks, so the tail is cheap.
    """
    p = np.clip(np.asarray(p0, dtype=float), _LO, _HI)
    r, J = residuals_and_jacobian(p, s, chi, w_s, w_q, protocol)
    cost = np.einsum("ij,ij->i", r, r)
    mu = np.full(len(p), float(mu0))
    active = np.arange(len(p))
    pairs = [(i, k) for i in range(5) for k in range(i, 5)]
    for _ in range(max_iter):
        if active.size == 0:
            break
        pa, ra, Ja, ca, mua = p[active], r[active], J[:, active], cost[active], mu[active]
        A = np.empty((5, 5, active.size))
        for i, k in pairs:
            A[i, k] = A[k, i] = np.einsum("nj,nj->n", Ja[i], Ja[k])
        g = np.einsum("inj,nj->in", Ja, ra)
        frozen = (((pa <= _LO) & (g.T > 0)) | ((pa >= _HI) & (g.T < 0))).T
        # Jacobi scaling (unit diagonal), damping mu on the diagonal, frozen rows -> identity.
        scale = np.where(frozen, 0.0, 1.0 / np.sqrt(np.maximum(np.einsum("iin->in", A), 1e-300)))
        A = A * scale[:, None, :] * scale[None, :, :]
        for i in range(5):
            A[i, i] = np.where(frozen[i], 1.0, 1.0 + mua)
        step = -_solve_spd(A, g * scale) * scale
        trial = np.clip(pa + step.T, _LO, _HI)
        rt, Jt = residuals_and_jacobian(trial, s[active], chi[active], w_s[active], w_q[active], protocol)
        ct = np.einsum("ij,ij->i", rt, rt)
        better = ct < ca
        idx = active[better]
        p[idx], r[idx], cost[idx] = trial[better], rt[better], ct[better]
        J[:, idx] = Jt[:, better]
        rel = (ca - ct) / np.maximum(ca, 1e-300)
        mu[active] = np.where(better, mua * 0.3, mua * 4.0).clip(1e-9, 1e10)
        done = (better & (rel < tol)) | (mu[active] >= 1e10) | (cost[active] < 1e-16)
        active = active[~done]
    return p, cost


# --- Initial values -----------------------------------------------------------------------------
def mono_exponential(s: np.ndarray, protocol: physics.Protocol):
    """Log-linear fit s = S0* exp(-R2* t), weighted by s^2 (the noise of log s is sd/s)."""
    te = protocol.te
    logs = np.log(np.maximum(s, 1e-6))
    w = np.maximum(s, 1e-6) ** 2
    sw, st, stt = w.sum(1), w @ te, w @ te ** 2
    sy, sty = (w * logs).sum(1), (w * logs) @ te
    den = sw * stt - st ** 2
    slope = (sw * sty - st * sy) / den
    intercept = (sy - slope * st) / sw
    return np.exp(intercept), -slope


def initial_guess(s, chi, protocol, Y0: float):
    """Start values for one multi-start branch (method.md)."""
    S0s, R2s = mono_exponential(s, protocol)
    Y = np.full(len(s), Y0)
    v = np.full(len(s), V0)
    blood = _BLOOD_OFFSET - _DQDY_BLOOD * Y
    chi_nb = (chi - blood * v) / (1.0 - v / physics.ALPHA)  # the QSM equation, linear in chi_nb
    chi_nb = np.clip(chi_nb, *physics.BOUNDS["chi_nb"])
    dw = physics.frequency_shift(Y, chi_nb, protocol.field_strength)
    R2 = np.maximum(1.0, R2s - V0 * dw)  # long-time limit: R2* = R2 + v dw
    return np.clip(np.stack([S0s, R2, Y, v, chi_nb], axis=1), _LO, _HI)


def fit_nlls(s, chi, w_s, w_q, protocol, starts=Y_STARTS, max_iter=60, screen_iter=8):
    """Multi-start NLLS on normalised echoes; returns (p (M, 5), cost (M,)).

    Every start runs screen_iter LM iterations; each voxel's lowest-cost branch then continues to
    convergence (or max_iter in all). The branches have almost always separated by then, and
    this halves the time against running all four to convergence.
    """
    best_p, best_cost = None, None
    for Y0 in starts:
        p, cost = levenberg_marquardt(initial_guess(s, chi, protocol, Y0), s, chi, w_s, w_q, protocol, screen_iter)
        if best_p is None:
            best_p, best_cost = p, cost
        else:
            better = cost < best_cost
            best_p[better], best_cost[better] = p[better], cost[better]
    if max_iter > screen_iter:
        best_p, best_cost = levenberg_marquardt(best_p, s, chi, w_s, w_q, protocol, max_iter - screen_iter)
    return best_p, best_cost


# --- Noise levels -------------------------------------------------------------------------------
def estimate_noise_sigma(echoes: np.ndarray, protocol: physics.Protocol, max_voxels: int = 20000,
                         seed: int = 0) -> float:
    """Magnitude noise sd (input units) from the scatter of each decay about a cubic in TE.

    A smooth decay over 8 echoes is fitted by a cubic far below the noise, so the residual sum of
    squares over E - 4 degrees of freedom estimates sigma^2; the median over voxels (divided by the
    median of chi2_k / k, Wilson-Hilferty) is robust to the few badly fitted voxels.
    """
    E = echoes.shape[1]
    if E < 6:
        raise InputError(f"Noise estimation needs at least 6 echoes, got {E}; pass noise_sigma.")
    rng = np.random.default_rng(seed)
    sub = echoes if len(echoes) <= max_voxels else echoes[rng.choice(len(echoes), max_voxels, replace=False)]
    t = (protocol.te - protocol.te.mean()) / protocol.te.std()
    V = np.vander(t, 4)
    H = V @ np.linalg.pinv(V)
    res = sub @ (np.eye(E) - H).T
    k = E - 4
    median_chi2 = k * (1 - 2 / (9 * k)) ** 3
    return float(np.sqrt(np.median((res ** 2).sum(1)) / median_chi2))


# --- CAT ----------------------------------------------------------------------------------------
def _kmeans_bic(X, k_range, seed=0, max_samples=20000):
    """k-means with K chosen by BIC (spherical Gaussians of one shared variance) on a subsample."""
    from sklearn.cluster import KMeans

    rng = np.random.default_rng(seed)
    sub = X if len(X) <= max_samples else X[rng.choice(len(X), max_samples, replace=False)]
    n, d = sub.shape
    best = None
    for K in k_range:
        if K >= n:
            break
        km = KMeans(K, n_init=2, random_state=seed).fit(sub)
        sse = max(km.inertia_, 1e-300)
        counts = np.bincount(km.labels_, minlength=K)
        counts = counts[counts > 0]
        var = sse / (n * d)
        loglik = -0.5 * n * d * (np.log(2 * np.pi * var) + 1) + np.sum(counts * np.log(counts / n))
        bic = -2 * loglik + (K * d + K) * np.log(n)
        if best is None or bic < best[0]:
            best = (bic, km)
    return best[1]


def cat_start(s, chi, w_s, w_q, protocol, k_range=range(5, 21), seed=0):
    """CAT's start values: cluster the decays (+ QSM), fit each cluster mean; returns (p0 (M, 5), K).

    The voxelwise refinement (a few LM iterations from p0) is done by the caller in batches.
    """
    sigma_rel = 1.0 / np.median(w_s)
    sigma_q = 1.0 / w_q[0]
    X = np.concatenate([s[:, 1:] / sigma_rel, (chi / sigma_q)[:, None]], axis=1)  # noise units
    km = _kmeans_bic(X, k_range, seed)
    labels = km.predict(X)
    K = km.n_clusters
    counts = np.bincount(labels, minlength=K)
    present = counts > 0
    mean_s = np.stack([s[labels == k].mean(0) if present[k] else np.ones(s.shape[1]) for k in range(K)])
    mean_q = np.array([chi[labels == k].mean() if present[k] else 0.0 for k in range(K)])
    # Cluster means are averages: their noise is sd / sqrt(n) in both terms (lam unchanged).
    root_n = np.sqrt(np.maximum(counts, 1))
    p_cluster, _ = fit_nlls(mean_s, mean_q, root_n / sigma_rel, root_n / sigma_q, protocol, max_iter=200)
    p0 = p_cluster[labels]
    p0[:, 0] = p_cluster[labels, 0] * s[:, 0] / mean_s[labels, 0]  # S0 relative to this voxel
    return p0, K


# --- CCM ----------------------------------------------------------------------------------------
def _truncated_normal(rng, mean, sd, lo, hi, n):
    x = rng.normal(mean, sd, n) if sd > 0 else np.full(n, mean)
    bad = (x < lo) | (x > hi)
    while bad.any():  # redraw the few outside the range
        x[bad] = rng.normal(mean, sd, bad.sum())
        bad = (x < lo) | (x > hi)
    return x


# Rough brain volume shares of the non-CSF tissues, so the default database's prior matches a brain.
TISSUE_SHARES = {"cortical_GM": 0.47, "WM": 0.45, "deep_GM": 0.06, "iron_rich_deep_GM": 0.02}


@functools.lru_cache(maxsize=4)
def default_ccm_parameters(n: int = 200_000, seed: int = 0, prior_fraction: float = 0.8,
                           lesion_fraction: float = 0.1, pv_fraction: float = 0.3) -> dict:
    """Database parameter tuples when no training data set is at hand: a share prior_fraction from
    the tissue priors of phantom.TISSUE_PRIORS (CSF excluded; tissues in TISSUE_SHARES proportions,
    lesion_fraction of them with the lesion Y / v ranges, pv_fraction blended with CSF as at tissue
    borders), the rest uniform within the bounds. On a 2 mm SNR 100 test patient this default gives
    an OEF RMSE of 9.9 pp (12.5 pp with half uniform, no blending); a database from training truth
    (training_ccm_parameters, used by `evaluate`) gives 5.8 pp."""
    from . import phantom

    rng = np.random.default_rng(seed)
    n_prior = int(n * prior_fraction)
    counts = rng.multinomial(n_prior, list(TISSUE_SHARES.values()))
    per = np.split(np.arange(n_prior), np.cumsum(counts)[:-1])
    out = {name: np.empty(n) for name in ("R2", "Y", "v", "chi_nb")}
    for tissue, sel in zip(TISSUE_SHARES, per):
        prior = phantom.TISSUE_PRIORS[tissue]
        for name in out:
            out[name][sel] = _truncated_normal(rng, *prior[name], sel.size)
    # Lesion Y / v ranges on a share of the prior draws, so OEF 6-80 % is covered.
    lesion = rng.choice(n_prior, int(n_prior * lesion_fraction), replace=False)
    half = lesion.size // 2
    out["Y"][lesion[:half]] = rng.uniform(*phantom.MISERY_Y, half)
    out["v"][lesion[:half]] = rng.uniform(*phantom.MISERY_V, half)
    out["Y"][lesion[half:]] = rng.uniform(*phantom.INFARCT_Y, lesion.size - half)
    out["v"][lesion[half:]] = rng.uniform(*phantom.INFARCT_V, lesion.size - half)
    # Partial volume with CSF at tissue borders (the phantom blends parameters by tissue fraction).
    pv = rng.choice(n_prior, int(n_prior * pv_fraction), replace=False)
    f = rng.uniform(0.0, 0.6, pv.size)
    for name in out:
        csf = _truncated_normal(rng, *phantom.TISSUE_PRIORS["CSF"][name], pv.size)
        out[name][pv] = (1 - f) * out[name][pv] + f * csf
    for name in out:
        out[name][n_prior:] = rng.uniform(*physics.BOUNDS[name], n - n_prior)
    return out


@functools.lru_cache(maxsize=4)
def training_ccm_parameters(dataset: str, n: int = 200_000, seed: int = 0) -> dict:
    """Database parameter tuples sampled from the truth maps of a data set's training patients."""
    from . import simulate

    folders = simulate.list_patients(dataset, "train")
    if not folders:
        raise InputError(f"{dataset} has no training patients ({', '.join(simulate.TRAIN_PATIENTS)}).")
    rng = np.random.default_rng(seed)
    pools = []
    for folder in folders:
        patient = simulate.load_patient(folder)
        mask = patient.mask
        pools.append(np.stack([patient.truth[k][mask] for k in ("R2", "Y", "v", "chi_nb")], axis=1))
    pool = np.concatenate(pools)
    pick = pool[rng.choice(len(pool), min(n, len(pool)), replace=False)].astype(float)
    return {k: pick[:, i] for i, k in enumerate(("R2", "Y", "v", "chi_nb"))}


class CCMDatabase:
    """Simulated normalised decays + QSM in noise units, k-means clustered, one k-d tree per cluster."""

    def __init__(self, params: dict, protocol: physics.Protocol, sigma_rel: float, sigma_q: float,
                 n_clusters: int = CCM_CLUSTERS, seed: int = 0):
        from scipy.spatial import cKDTree
        from sklearn.cluster import KMeans

        R2, Y, v, chi = (np.clip(np.asarray(params[k], float), *physics.BOUNDS[k]) for k in ("R2", "Y", "v", "chi_nb"))
        m = physics.qbold_signal(1.0, R2, Y, v, chi, protocol)
        q = physics.qsm_value(Y, v, chi)
        # S0 relative to echo 1 is 1 / m_1 for a decay simulated with S0 = 1.
        self.params = np.stack([1.0 / m[:, 0], R2, Y, v, chi], axis=1)
        self.scale = np.concatenate([np.full(protocol.n_echoes - 1, 1.0 / sigma_rel), [1.0 / sigma_q]])
        self.features = np.concatenate([m[:, 1:] / m[:, :1], q[:, None]], axis=1) * self.scale
        rng = np.random.default_rng(seed)
        sub = self.features[rng.choice(len(self.features), min(50000, len(self.features)), replace=False)]
        km = KMeans(n_clusters, n_init=1, random_state=seed).fit(sub)
        self.centroids = km.cluster_centers_
        self.labels = self._nearest_centroid(self.features)
        self.members = [np.flatnonzero(self.labels == k) for k in range(n_clusters)]
        self.trees = [cKDTree(self.features[idx]) if idx.size else None for idx in self.members]

    def _nearest_centroid(self, X):
        d2 = (X ** 2).sum(1)[:, None] - 2 * X @ self.centroids.T + (self.centroids ** 2).sum(1)
        return np.argmin(d2, axis=1)

    def match(self, s: np.ndarray, chi: np.ndarray, k: int = CCM_NEIGHBOURS) -> np.ndarray:
        """Parameters (M, 5) for normalised decays s (M, E) and QSM chi (M,)."""
        X = np.concatenate([s[:, 1:], chi[:, None]], axis=1) * self.scale
        labels = self._nearest_centroid(X)
        out = np.empty((len(X), 5))
        for c in np.unique(labels):
            sel = np.flatnonzero(labels == c)
            members = self.members[c]
            kk = min(k, members.size)
            d, j = self.trees[c].query(X[sel], kk)
            d, j = d.reshape(len(sel), kk), j.reshape(len(sel), kk)
            w = 1.0 / np.maximum(d, 1e-9)  # inverse distance; an exact match dominates
            out[sel] = np.einsum("nk,nkp->np", w, self.params[members[j]]) / w.sum(1, keepdims=True)
        return out


def ccm_database(protocol: physics.Protocol, sigma_rel: float, sigma_q: float,
                 dataset: str | Path | None = None) -> CCMDatabase:
    """The CCM database for a protocol and noise levels (relative magnitude sd, QSM sd in ppm),
    from a data set's training truth or (dataset None) the default priors; cached. Only the ratio
    of the two noise levels shapes the neighbourhoods, so it is rounded to 10 steps per decade
    and voxel sets with slightly different noise estimates share one database."""
    source = "priors" if dataset is None else str(Path(dataset).resolve())
    ratio = 10.0 ** (np.round(10.0 * np.log10(sigma_rel / sigma_q)) / 10.0)
    return _cached_database(source, protocol, float(ratio))


@functools.lru_cache(maxsize=4)
def _cached_database(source: str, protocol: physics.Protocol, ratio: float) -> CCMDatabase:
    params = default_ccm_parameters() if source == "priors" else training_ccm_parameters(source)
    return CCMDatabase(params, protocol, ratio * DEFAULT_QSM_SIGMA_PPM, DEFAULT_QSM_SIGMA_PPM)


# --- Entry point ----------------------------------------------------------------------------------
def predict_voxels(method: str, echoes, qsm, protocol: physics.Protocol, progress=None, cancel_event=None,
                   *, noise_sigma: float | None = None, qsm_sigma_ppm: float | None = None,
                   ccm_dataset: str | Path | None = None, ccm_db: CCMDatabase | None = None,
                   cat_refine_iterations: int = CAT_REFINE_ITERATIONS,
                   batch_size: int = 20000) -> dict[str, np.ndarray]:
    """QQ parameters of N voxels by a classical method ('nlls', 'cat' or 'ccm').

    echoes (N, E) magnitudes in any units, qsm (N,) ppm. noise_sigma: magnitude noise sd in the
    echoes' units (estimated from the data when None); qsm_sigma_ppm: QSM noise sd (default 2 ppb).
    ccm_dataset: a data set whose training patients' truth seeds the CCM database (default: tissue
    priors + uniform, fixed seed, cached); ccm_db: a ready database (overrides ccm_dataset).
    cat_refine_iterations: CAT's voxelwise LM steps.
    Returns S0 (input units), R2, Y, v, chi_nb, each (N,) and within physics.BOUNDS; voxels with a
    non-positive or non-finite echo 1 or non-finite inputs get NaN.
    progress(fraction, message) is called between batches; a set cancel_event raises CancelledError.
    """
    method = method.lower()
    if method not in METHODS:
        raise InputError(f"Unknown method {method!r}; choose one of {', '.join(METHODS)} (or lstm, dnn).")
    echoes = np.asarray(echoes, dtype=float)
    qsm = np.asarray(qsm, dtype=float).reshape(-1)
    if echoes.ndim != 2 or echoes.shape[1] != protocol.n_echoes or len(qsm) != len(echoes):
        raise InputError(f"Expected echoes (N, {protocol.n_echoes}) and qsm (N,), got {echoes.shape} and {qsm.shape}.")
    N = len(echoes)
    out = {name: np.full(N, np.nan) for name in NAMES}
    valid = np.flatnonzero(np.isfinite(echoes).all(1) & np.isfinite(qsm) & (echoes[:, 0] > 0))
    if valid.size == 0:
        return out

    def check_cancel():
        if cancel_event is not None and cancel_event.is_set():
            raise CancelledError(f"{METHOD_LABELS[method]} cancelled.")

    echo1 = echoes[valid, 0]
    s = echoes[valid] / echo1[:, None]
    chi = qsm[valid]
    if noise_sigma is None:
        noise_sigma = estimate_noise_sigma(echoes[valid], protocol)
    sigma_rel = np.maximum(noise_sigma / echo1, MIN_RELATIVE_SIGMA)
    sigma_q = max(DEFAULT_QSM_SIGMA_PPM if qsm_sigma_ppm is None else qsm_sigma_ppm, MIN_QSM_SIGMA_PPM)
    w_s, w_q = 1.0 / sigma_rel, np.full(len(s), 1.0 / sigma_q)
    check_cancel()
    p = np.empty((len(s), 5))
    p0 = db = None
    if method == "cat":
        if progress:
            progress(0.0, "CAT: clustering the decay curves")
        p0, K = cat_start(s, chi, w_s, w_q, protocol)
    elif method == "ccm":
        db = ccm_db or ccm_database(protocol, float(np.median(sigma_rel)), sigma_q, ccm_dataset)
    for start in range(0, len(s), batch_size):
        check_cancel()
        b = slice(start, start + batch_size)
        if method == "nlls":
            p[b] = fit_nlls(s[b], chi[b], w_s[b], w_q[b], protocol)[0]
        elif method == "cat":
            p[b] = levenberg_marquardt(p0[b], s[b], chi[b], w_s[b], w_q[b], protocol, cat_refine_iterations,
                                       mu0=CAT_REFINE_DAMPING)[0]
        else:
            p[b] = db.match(s[b], chi[b])
        if progress:
            done = min(start + batch_size, len(s))
            progress(done / len(s), f"{METHOD_LABELS[method]}: {done}/{len(s)} voxels")
    check_cancel()
    p = np.clip(p, _LO, _HI)
    p[:, 0] *= echo1  # S0 back to the input's units
    for i, name in enumerate(NAMES):
        out[name][valid] = p[:, i]
    return out


# --- The evaluate registry ----------------------------------------------------------------------
def evaluate_factory(method: str):
    """A factory for evaluate.METHODS: predict(patient, targets) on in-mask voxel positions.

    The magnitude noise is estimated from each patient's voxels (as the engine does); the QSM
    noise sd is the data set's (its sidecar), 2 ppb when 0. CCM's database is built once here,
    from the data set's training truth, at the data set's SNR (a one-off cost, like training).
    """
    def factory(ctx) -> callable:
        from . import simulate

        db = None
        if method == "ccm":
            sidecar = simulate.load_patient(simulate.list_patients(ctx.dataset, "test")[0], with_truth=False).sidecar
            snr = sidecar.get("SNR") or 1.0 / MIN_RELATIVE_SIGMA
            db = ccm_database(physics.Protocol.from_dict(sidecar), max(1.0 / snr, MIN_RELATIVE_SIGMA),
                              _qsm_sigma(sidecar), ctx.dataset)

        def predict(patient, targets):
            rows = patient.echoes[patient.mask][targets]
            qsm = patient.qsm[patient.mask][targets]
            return predict_voxels(method, rows, qsm, patient.protocol, qsm_sigma_ppm=_qsm_sigma(patient.sidecar),
                                  ccm_db=db)

        return predict

    return factory


def _qsm_sigma(sidecar: dict | None) -> float:
    ppb = (sidecar or {}).get("QSMNoisePPB") or 0.0
    return ppb * 1e-3 if ppb > 0 else DEFAULT_QSM_SIGMA_PPM
