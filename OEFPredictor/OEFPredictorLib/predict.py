"""The prediction engine: echoes + QSM (+ mask, CBF, field map) -> OEF and QQ parameter maps.

Used by the command line (`oefpredictor predict`, `oefpredictor demo`) and by the Slicer module
(through PredictionJob, which runs the engine in a background thread).

A method is first built with the data's acquisition (Predictor: the registry entry, its model, the
protocol, which is checked against the model there), then run by predict_maps:
1. validate the arrays (shapes, 3D, echo count against the echo times);
2. the mask: the given one, or one derived from the data (where the QSM is defined, else from
   echo 1; see derived_mask; the result says which in mask_source); voxels with
   NaN/Inf values or echo 1 <= 0 are taken out of it with a warning, so they never reach a window;
   with a field map, the echoes are corrected for the macroscopic field gradients it shows
   (fieldmap.py), and voxels whose signal the gradient took mostly away are taken out with a warning;
3. per-voxel features (echoes / echo 1, QSM * qsm_scale; sequences.voxel_features);
4. Predictor.fit: a spatial model on the whole volume, or, voxelwise, chunk by chunk (the chunk
   size follows from memory_budget_mb) the windows of the chunk through the network on batches;
   decoded and clamped to physics.BOUNDS (S0 relative to echo 1); progress and cancellation are
   checked between batches; then the quality map, for every kind of method alike;
5. OEF = 100 (1 - Y / 0.98) percent, CMRO2 = CBF * OEF * [H]a when CBF is given.

Quality map (lower is better): the normalised RMS residual between the measurements and the QQ
forward model of the predicted (clamped) parameters,

    quality = sqrt( ( sum_j ((S_j - S^_j) / S_1)^2 + ((chi - chi^) / 0.2 ppm)^2 ) / (E + 1) )

The echo residuals are relative to the voxel's echo-1 magnitude, the QSM residual relative to
0.2 ppm (the span of brain tissue susceptibility), so 1 % of either counts alike. A prediction that
explains the data leaves about the noise level (~0.01 at SNR 100, QSM noise 2 ppb); larger values
mark voxels the model cannot explain (artefacts, unmodelled tissue, wrong protocol).
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np

from . import fieldmap, maptable, methods, physics, plausibility, sequences
from .errors import CancelledError, InputError
from .jobs import BackgroundJob, call_interruptibly

log = logging.getLogger(__name__)

QSM_RESIDUAL_SCALE_PPM = 0.2  # see the quality-map definition above
DEVICES = ("auto", "cpu", "gpu")
DEFAULT_BATCH = 4096  # voxels per network call: large enough to keep the call overhead small
MIN_CHUNK, MAX_CHUNK = 1024, 262_144

Progress = Callable[[float, str], None]


# --- Inputs -----------------------------------------------------------------------------------
@dataclasses.dataclass
class PredictionInputs:
    """Arrays in SimpleITK order: echoes (z, y, x, E) magnitudes, qsm (z, y, x) ppm, optional mask
    (z, y, x) bool, CBF (z, y, x) mL/100 g/min and field map (z, y, x) Hz (the field whose gradients
    dephase the echoes; fieldmap.py); protocol: the echo times of the data; spacing: the voxel size
    (x, y, z) in mm, as io.Geometry.spacing (the spatial model resamples to its grid)."""

    echoes: np.ndarray
    qsm: np.ndarray
    protocol: physics.Protocol
    mask: np.ndarray | None = None
    cbf: np.ndarray | None = None
    spacing: tuple[float, float, float] | None = None
    field_map: np.ndarray | None = None

    def validate(self) -> list[str]:
        """Raise InputError for unusable inputs; return warnings (e.g. NaN voxels left out). Whether
        a method's model suits the protocol is Predictor's check."""
        echoes, qsm = np.asarray(self.echoes), np.asarray(self.qsm)
        if echoes.ndim == 3 and qsm.ndim == 2:
            raise InputError(f"The images are 2D (echoes {echoes.shape}, QSM {qsm.shape}); OEF prediction "
                             "needs 3D volumes (z, y, x) and echoes (z, y, x, echo).")
        if qsm.ndim != 3:
            raise InputError(f"QSM must be a 3D volume (z, y, x); got shape {qsm.shape}"
                             + (" (a 2D image)." if qsm.ndim == 2 else "."))
        if echoes.ndim != 4:
            raise InputError(f"Echoes must be a 4D array (z, y, x, echo); got shape {echoes.shape}"
                             + (" (a 2D image per echo, or a single echo)." if echoes.ndim == 3 else "."))
        if min(qsm.shape) < 1 or sum(s > 1 for s in qsm.shape) < 2:
            raise InputError(f"The volume {qsm.shape} is not 3D image data.")
        if echoes.shape[:3] != qsm.shape:
            raise InputError(f"Echoes {echoes.shape[:3]} and QSM {qsm.shape} differ in size (z, y, x); "
                             "resample them onto the same grid.")
        if echoes.shape[3] != self.protocol.n_echoes:
            raise InputError(f"The echo series has {echoes.shape[3]} echoes but {self.protocol.n_echoes} echo "
                             f"times were given ({self.protocol.describe()}).")
        for name, extra in (("mask", self.mask), ("CBF", self.cbf), ("field map", self.field_map)):
            if extra is not None and np.shape(extra) != qsm.shape:
                raise InputError(f"The {name} {np.shape(extra)} and QSM {qsm.shape} differ in size (z, y, x).")
        warnings = []
        mask = self.mask
        if mask is not None:
            m = np.asarray(mask)
            if m.dtype.kind == "f" and not np.all(np.isfinite(m)):
                raise InputError("The mask contains NaN/Inf values; give a 0/1 mask.")
            if not np.any(m):
                raise InputError("The mask is empty (no voxel inside); give a brain mask, or none to derive one.")
        # Without a mask the background (echo 1 = 0) is no news: predict_maps warns about invalid
        # voxels inside the derived mask instead.
        n_bad = 0 if mask is None else int(np.count_nonzero(invalid_voxels(echoes, qsm) & np.asarray(mask, bool)))
        if n_bad:
            warnings.append(f"{n_bad} voxel(s) with NaN/Inf values or echo 1 <= 0 were left out of the mask "
                            "(their maps are 0).")
        warnings += plausibility.check_inputs(echoes, qsm, mask, self.protocol.echo_times_ms)
        return warnings


def invalid_voxels(echoes: np.ndarray, qsm: np.ndarray) -> np.ndarray:
    """Voxels that cannot be predicted: any NaN/Inf echo or QSM, or a non-positive echo 1."""
    bad = ~np.isfinite(qsm)
    for e in range(echoes.shape[-1]):  # echo by echo: no (z, y, x, E) temporary
        bad |= ~np.isfinite(echoes[..., e])
    with np.errstate(invalid="ignore"):
        bad |= ~(echoes[..., 0] > 0)
    return bad


# A QSM defined (finite, not exactly 0) in at most this share of the volume was masked by its
# pipeline; one defined (almost) everywhere was not, and the mask comes from echo 1 instead.
MAX_QSM_SUPPORT = 0.9
MASK_FROM_QSM = "derived: where the QSM is defined (finite and not exactly 0; its pipeline masked the brain)"
MASK_FROM_ECHO1 = "derived: from the echo-1 magnitude (the QSM is defined almost everywhere)"


def derived_mask(echo1: np.ndarray, qsm: np.ndarray) -> tuple[np.ndarray, str]:
    """The default mask and how it was made: a QSM pipeline has already masked the brain (the
    QSM is 0 or NaN outside it), so where the QSM is defined is the brain mask of the data; a QSM
    defined almost everywhere gives no mask, and then echo 1 does (derive_brain_mask)."""
    with np.errstate(invalid="ignore"):
        defined = np.isfinite(qsm) & (qsm != 0)
    if defined.any() and defined.mean() <= MAX_QSM_SUPPORT:
        return defined, MASK_FROM_QSM
    return derive_brain_mask(echo1), MASK_FROM_ECHO1


def derive_brain_mask(echo1: np.ndarray) -> np.ndarray:
    """A brain mask from the echo-1 magnitude: Otsu threshold over all voxels (background noise
    vs tissue),
    morphological opening (removes noise specks and thin bridges), the largest connected component,
    then a closing and hole filling (keeps dark CSF and vessels inside)."""
    from scipy import ndimage

    img = np.nan_to_num(np.asarray(echo1, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    if not np.any(img > 0):
        raise InputError("Echo 1 has no positive voxels; cannot derive a brain mask. Give --mask.")
    threshold = _otsu(img.ravel())
    mask = img > threshold
    structure = ndimage.generate_binary_structure(3, 1)
    opened = ndimage.binary_opening(mask, structure, iterations=1)
    if opened.any():
        mask = opened
    labels, n = ndimage.label(mask, structure)
    if n > 1:
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        mask = labels == int(np.argmax(sizes))
    mask = ndimage.binary_closing(mask, structure, iterations=2, border_value=0) | mask
    for k in range(mask.shape[0]):  # slice-wise too: CSF spaces open to one side in 3D
        mask[k] = ndimage.binary_fill_holes(mask[k])
    mask = ndimage.binary_fill_holes(mask)
    if not mask.any():
        raise InputError("Could not derive a brain mask from echo 1; give --mask.")
    return mask


def _otsu(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold (maximum between-class variance) of a 1D sample."""
    hist, edges = np.histogram(values, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    with np.errstate(divide="ignore", invalid="ignore"):
        mu0 = m0 / w0
        mu1 = (m0[-1] - m0) / w1
        between = w0 * w1 * (mu0 - mu1) ** 2
    return float(centres[int(np.nanargmax(between[:-1]))])


# --- Result ------------------------------------------------------------------------------------
@dataclasses.dataclass
class PredictionResult:
    """maps: float32 (z, y, x) arrays, 0 outside the mask: OEF (%), S0 (input units), R2 (Hz), Y, v,
    chi_nb (ppm), quality (normalised residual, see the module doc) and CMRO2 (umol/100 g/min) with
    CBF. mask: the voxels predicted. mask_derived: True when the mask came from the data."""

    maps: dict[str, np.ndarray]
    mask: np.ndarray
    warnings: list[str]
    elapsed_s: float
    device: str
    model_card: dict | None
    method: str = methods.DEFAULT_METHOD
    mask_derived: bool = False
    n_voxels: int = 0
    mask_source: str = "given"  # or how the mask was derived (MASK_FROM_QSM, MASK_FROM_ECHO1)


# --- Models and devices ------------------------------------------------------------------------
def resolve_model(model=None, method: str = methods.DEFAULT_METHOD, protocol: physics.Protocol | None = None):
    """A ModelBundle from None (the method's bundled model: with a protocol, the first of its bundled models
    that reads it, see bundled_for_protocol), a path, or a bundle."""
    from . import resources

    if model is not None and not isinstance(model, (str, Path)):
        return model  # a ModelBundle already
    if model is None:
        spec = methods.get(method)
        if not spec.uses_model:
            raise InputError(f"Method '{spec.name}' uses no trained model.")
        try:
            paths = resources.bundled_model_paths(spec.name)
        except FileNotFoundError as exc:
            raise InputError(f"The bundled model of method '{spec.name}' ({spec.label}) is not installed ({exc}) Train one with "
                             "`oefpredictor train`, or give a model file.") from None
        if protocol is not None and len(paths) > 1:
            return bundled_for_protocol(paths, protocol)
        path = paths[0]
    else:
        path = Path(model)
    return _load(path)


def _load(path: Path):
    path = Path(path).resolve()
    if not path.exists():
        raise InputError(f"{path}: no such model file.")
    st = path.stat()
    return _load_cached(str(path), st.st_mtime_ns, st.st_size)


def bundled_for_protocol(paths: list[Path], protocol: physics.Protocol):
    """The first of a method's bundled models (paths in order of preference) that reads this protocol, loaded
    only as far as needed. Each bundled context model reads the echo trains that cover its own span in 3 T-
    equivalent time; when none does, one line names every span and what runs instead."""
    bundles = []
    for path in paths:
        bundles.append(_load(path))
        try:
            bundles[-1].check_protocol(protocol)
        except InputError:
            continue
        return bundles[-1]
    ranges = [b.protocol_range for b in bundles]
    if not all(r and r.spans_ms for r in ranges):
        bundles[0].check_protocol(protocol)  # models bound to one protocol each: the first one's message
    problems = ranges[0].problems(protocol)
    spans = " or ".join(f"{r.reach()} ({b.path.name})" for r, b in zip(ranges, bundles))
    general = dataclasses.replace(ranges[0], spans_ms=None).describe()
    raise InputError(f"The bundled models read {general}, with echoes in 3 T-equivalent time (TE x B0 / 3) {spans}; "
                     f"these data have {', '.join(problems)}. Use --method cat (needs no trained model), or train a "
                     "model for this protocol (oefpredictor train).")


@functools.lru_cache(maxsize=4)
def _load_cached(path: str, mtime_ns: int, size: int):
    # Keyed by modification time and size: a replaced file is loaded again. Loading the paper's
    # LSTM takes seconds; Slicer users predict many times per session.
    from . import models

    return models.load_bundle(path)


def resolve_method(method: str | None, model=None, protocol: physics.Protocol | None = None):
    """(methods.Method, ModelBundle or None). method None: the method the given model was trained
    for (its card), or the default method without a model. A model that does not suit the method
    is refused here, before any work. `protocol`: the data's, which picks among bundled models."""
    if method is None and model is not None:
        bundle = resolve_model(model)
        return methods.of_card(bundle.card), bundle
    spec = methods.get(method)
    if not spec.uses_model:
        return spec, None
    bundle = resolve_model(model, spec.name, protocol)
    trained_for = methods.of_card(bundle.card)
    if (trained_for.kind == "spatial") != (spec.kind == "spatial"):
        raise InputError(f"{bundle.path.name} is a {trained_for.kind} model ({trained_for.label}); it cannot run "
                         f"as method '{spec.name}'. Use --method {trained_for.name}, or leave --method out.")
    return spec, bundle


def gpu_available() -> bool:
    """Whether the Keras backend sees a GPU."""
    import keras

    backend = keras.backend.backend()
    try:
        if backend == "tensorflow":
            import tensorflow as tf

            return bool(tf.config.list_physical_devices("GPU"))
        if backend == "torch":
            import torch

            return bool(torch.cuda.is_available() or torch.backends.mps.is_available())
        if backend == "jax":
            import jax

            return any(d.platform == "gpu" for d in jax.devices())
    except Exception:  # a broken driver counts as no GPU
        return False
    return False


def choose_device(device: str) -> tuple[str, list[str]]:
    """'cpu' or 'gpu' for a requested device, plus messages for the user."""
    if device not in DEVICES:
        raise InputError(f"Unknown device {device!r}; use one of {', '.join(DEVICES)}.")
    if device == "cpu":
        return "cpu", []
    has_gpu = gpu_available()
    if device == "gpu" and not has_gpu:
        raise InputError("--device gpu was asked for, but the Keras backend sees no GPU (check the driver "
                         "and a GPU build of TensorFlow/PyTorch), or use --device cpu.")
    return ("gpu", []) if has_gpu else ("cpu", [])


def _device_scope(device: str):
    import keras

    return keras.device("gpu:0" if device == "gpu" else "cpu:0")


def _is_out_of_memory(exc: BaseException) -> bool:
    text = f"{type(exc).__name__} {exc}".lower()
    return any(k in text for k in ("resourceexhausted", "out of memory", "oom", "cuda_error_out_of_memory"))


def chunk_size_for(bundle, n_features: int, memory_budget_mb: int) -> int:
    """Target voxels per chunk so that the chunk's windows, activations and forward-model
    temporaries stay within the memory budget."""
    L = bundle.window_length
    activations = 0
    for layer in bundle.model.layers:
        try:
            dims = [d for d in layer.output.shape[1:] if d]
        except Exception:  # layers without a single static output
            continue
        activations += int(np.prod(dims)) if dims else 0
    # windows (float32) + activations (x4: LSTM gates and framework temporaries) + outputs,
    # forward model and quality in float64 (about 12 arrays of E values)
    per_voxel = 4 * L * n_features + 4 * 4 * activations + 8 * 12 * n_features
    chunk = int(memory_budget_mb * 2 ** 20 / max(per_voxel, 1))
    return int(np.clip(chunk, MIN_CHUNK, MAX_CHUNK))


# --- A method built with its acquisition ----------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Predictor:
    """A method ready for data of one acquisition, as dipy builds Model(acquisition) before
    fit(data, mask): the registry entry, its trained model (None for the classical fits) and the
    protocol, which is checked against the model here and nowhere else. Spatial models get the
    protocol with the volume (their features may depend on it)."""

    method: methods.Method
    bundle: object | None  # models.ModelBundle
    protocol: physics.Protocol

    def __post_init__(self):
        if self.bundle is not None:
            self.bundle.check_protocol(self.protocol)

    @classmethod
    def build(cls, protocol: physics.Protocol, method: str | None = None, model=None) -> "Predictor":
        """resolve_method (the method named, or the one the model was trained for), then the check."""
        return cls(*resolve_method(method, model, protocol), protocol)

    def caveats(self) -> list[str]:
        """What the user must know of the model chosen: a bundled model other than the method's preferred one
        runs when the echoes do not cover the preferred one's span, and it sees less of the decay; a first echo
        later than the model's is continued back to it."""
        from . import decay, models, resources

        if self.bundle is None or not self.method.uses_model:
            return []
        out = []
        tau_ms = decay.equivalent_times(self.protocol) * 1000.0
        reads = self.bundle.protocol_range.spans_ms if self.bundle.protocol_range else None
        preferred = resources.bundled_model_path(self.method.name)
        if self.bundle.path.name != preferred.name and self.bundle.path.parent == preferred.parent:
            wanted = models.read_card(preferred)["supported_protocols"]["spans_ms"]
            out.append(f"The echoes cover {tau_ms[0]:.3g}-{tau_ms[-1]:.3g} ms in 3 T-equivalent time (TE x B0 / 3), "
                       f"not {wanted[0]:g}-{wanted[1]:g} ms, so the map comes from {self.bundle.path.name}, which reads "
                       f"only {reads[0]:g}-{reads[1]:g} ms of the decay: the map leans on the training population for "
                       "the brain's overall OEF level, its interval is wider, and lesions may not show (a normal-"
                       "looking region is not evidence of normal OEF).")
        before, after = decay.continued_ms(tau_ms, reads) if reads else (0.0, 0.0)
        beyond = []  # where the model's echo times lie beyond the data's
        if before > decay.LATE_FIRST_ECHO_NOTICE_MS:
            beyond.append(f"the first echo comes at {tau_ms[0]:.3g} ms, after the model's first echo time "
                          f"({reads[0]:g} ms)")
        if after > decay.LAST_ECHO_TOLERANCE_MS:
            beyond.append(f"the last echo comes at {tau_ms[-1]:.3g} ms, before the model's last echo time "
                          f"({reads[1]:g} ms)")
        if beyond:
            out.append(f"In 3 T-equivalent time (TE x B0 / 3) {' and '.join(beyond)}: each voxel's decay is continued "
                       "there by its qBOLD fit, which can move the OEF level by a point or two; the interval is "
                       "widened for it.")
        return out

    def fit(self, data: "_Voxels", run: "_Session") -> dict[str, np.ndarray]:
        """The clamped parameters (and the OEF interval, where the method gives one) of the mask's voxels."""
        return RUNNERS[self.method.kind](self, data, run)

    def _fit_spatial(self, data: "_Voxels", run: "_Session") -> dict[str, np.ndarray]:
        """The spatial model on the whole volume (it reads only the mask's voxels; no zeroed copy)."""
        from . import spatial

        inputs, bundle = data.inputs, self.bundle
        if inputs.spacing is None:
            spacing_zyx = (float(bundle.card["spatial"]["voxel_size_mm"]),) * 3
            run.warnings.append(f"The voxel size is unknown; assumed the model's {spacing_zyx[0]:g} mm.")
        else:
            spacing_zyx = tuple(float(s) for s in inputs.spacing[::-1])

        def on(device):
            with _device_scope(device):
                return spatial.predict_volume(bundle, np.asarray(inputs.echoes), np.asarray(inputs.qsm), data.mask,
                                              spacing_zyx, self.protocol, check_cancel=run.check_cancel,
                                              progress=run.report, warnings=run.warnings)
        try:
            values = on(run.device)
        except (CancelledError, KeyboardInterrupt, InputError):
            raise
        except Exception as exc:
            if run.device != "gpu" or run.requested == "gpu":
                raise
            run.warnings.append(f"The GPU failed ({type(exc).__name__}); continued on the CPU.")
            run.device = "cpu"
            values = on(run.device)
        return {name: values[name] for name in physics.PARAMETER_NAMES + maptable.INTERVAL}

    def _fit_voxelwise(self, data: "_Voxels", run: "_Session") -> dict[str, np.ndarray]:
        """Windows chunk by chunk, the network on batches, decoded and clamped."""
        from . import models

        bundle = self.bundle
        features, echo1 = sequences.voxel_features(data.echo_rows, data.qsm_rows, bundle.qsm_scale)
        n = len(features)
        chunk = run.chunk_voxels or chunk_size_for(bundle, features.shape[1], run.memory_budget_mb)
        batch = max(1, min(run.batch_size, chunk))
        params = {name: np.empty(n, dtype=np.float32) for name in physics.PARAMETER_NAMES}
        done = 0
        for start, stop in sequences.iter_chunks(n, chunk):
            windows = sequences.make_windows(features, start, stop, bundle.window_length, bundle.window_target)
            raw = np.empty((stop - start, len(physics.PARAMETER_NAMES)), dtype=np.float32)
            b0 = 0
            while b0 < len(windows):
                run.check_cancel()
                b1 = min(len(windows), b0 + batch)
                try:
                    with _device_scope(run.device):
                        # predict_on_batch: a compiled graph function, without model.predict's per-call
                        # overhead (data adapters, callbacks) and faster than eager model(x)
                        raw[b0:b1] = bundle.model.predict_on_batch(windows[b0:b1])
                except (CancelledError, KeyboardInterrupt):
                    raise
                except Exception as exc:
                    if run.device != "gpu":
                        raise
                    if _is_out_of_memory(exc) and batch > 256:
                        batch //= 2  # try smaller batches on the GPU first
                        run.warnings.append(f"GPU out of memory; batch size reduced to {batch}.")
                        continue
                    if run.requested == "gpu":
                        raise InputError(f"The GPU failed ({type(exc).__name__}: {str(exc).splitlines()[0][:160]}); "
                                         "use --device cpu or auto.") from None
                    run.device = "cpu"
                    run.warnings.append(f"The GPU failed ({type(exc).__name__}); continued on the CPU.")
                    continue
                done += b1 - b0
                b0 = b1
                run.report(0.05 + 0.9 * done / n, f"Predicting: {done}/{n} voxels")
            decoded = models.decode_outputs(raw, echo1[start:stop], bundle.output_scaling)
            clamped = physics.clamp_to_bounds(decoded, s0_scale=echo1[start:stop])
            for name in physics.PARAMETER_NAMES:
                params[name][start:stop] = clamped[name]
        return params

    def _fit_classical(self, data: "_Voxels", run: "_Session") -> dict[str, np.ndarray]:
        from . import baselines  # imported only when a voxelwise fit is asked for

        raw = baselines.predict_voxels(self.method.name, data.echo_rows, data.qsm_rows, self.protocol,
                                       lambda fraction, message="": run.report(0.05 + 0.9 * float(fraction), message),
                                       run.cancel_event)
        run.check_cancel()
        missing = [p for p in physics.PARAMETER_NAMES if p not in raw]
        if missing:
            raise RuntimeError(f"baselines.predict_voxels({self.method.name!r}) returned no {', '.join(missing)}.")
        clamped = physics.clamp_to_bounds({p: np.asarray(raw[p], dtype=np.float64) for p in physics.PARAMETER_NAMES},
                                          s0_scale=data.echo_rows[:, 0])
        return {p: clamped[p].astype(np.float32) for p in physics.PARAMETER_NAMES}


RUNNERS = {"spatial": Predictor._fit_spatial, "voxelwise": Predictor._fit_voxelwise,
           "classical": Predictor._fit_classical}  # by methods.KINDS


@dataclasses.dataclass
class _Voxels:
    """The data a method runs on: the inputs, the mask, and the mask's voxels as rows (C order), made when
    first read (a spatial model reads the volumes; its rows, for the quality map, then do not add to the
    network's peak memory)."""

    inputs: PredictionInputs
    mask: np.ndarray
    idx: np.ndarray  # the mask's flat indices

    @functools.cached_property
    def echo_rows(self) -> np.ndarray:
        echoes = np.asarray(self.inputs.echoes)
        return echoes.reshape(-1, echoes.shape[-1])[self.idx].astype(np.float32)

    @functools.cached_property
    def qsm_rows(self) -> np.ndarray:
        return np.asarray(self.inputs.qsm).reshape(-1)[self.idx].astype(np.float32)


@dataclasses.dataclass
class _Session:
    """How one run goes: its device (a failing GPU falls back to the CPU unless asked for), progress,
    cancellation, memory tuning and the warnings gathered."""

    device: str
    requested: str
    report: Progress
    cancel_event: threading.Event | None
    warnings: list[str]
    chunk_voxels: int | None = None
    memory_budget_mb: int = 1024
    batch_size: int = DEFAULT_BATCH

    def check_cancel(self):
        if self.cancel_event is not None and self.cancel_event.is_set():
            raise CancelledError("Prediction cancelled; nothing was produced.")


# --- The engine --------------------------------------------------------------------------------
def predict_maps(inputs: PredictionInputs, model=None, device: str = "auto", method: str | None = None,
                 progress: Progress | None = None, cancel_event: threading.Event | None = None,
                 chunk_voxels: int | None = None, memory_budget_mb: int = 1024,
                 batch_size: int = DEFAULT_BATCH) -> PredictionResult:
    """OEF and QQ parameter maps of one volume (see the module doc for the steps).

    model: a Predictor built for these inputs' protocol, or what Predictor.build takes: None (the
    bundled model of `method`), a .keras path, or a models.ModelBundle. method: a name of
    methods.METHODS (None: the model's own method, else methods.DEFAULT_METHOD); its kind picks
    the runner (RUNNERS): 'context' / 'unet' run a spatial model on the whole volume, 'lstm' /
    'dnn' a voxelwise Keras bundle, 'nlls' / 'cat' / 'ccm' baselines.predict_voxels.
    progress(fraction, message) is called from the running thread; cancel_event set ->
    CancelledError between batches, nothing is returned.
    """
    start = time.perf_counter()
    report = progress or (lambda fraction, message: None)
    run = _Session("cpu", device, report, cancel_event, [], chunk_voxels, memory_budget_mb, batch_size)
    run.check_cancel()
    report(0.0, "Loading the model")
    predictor = model if isinstance(model, Predictor) else Predictor.build(inputs.protocol, method, model)
    if predictor.protocol != inputs.protocol:
        predictor = Predictor(predictor.method, predictor.bundle, inputs.protocol)
    run.warnings += inputs.validate() + predictor.caveats()
    if predictor.method.uses_model:
        run.device, messages = choose_device(device)
        run.warnings += messages
    run.check_cancel()

    echoes = np.asarray(inputs.echoes)
    qsm = np.asarray(inputs.qsm)
    report(0.02, "Preparing the mask")
    mask_derived = inputs.mask is None
    mask, mask_source = derived_mask(echoes[..., 0], qsm) if mask_derived else (np.asarray(inputs.mask).astype(bool),
                                                                                  "given")
    bad = invalid_voxels(echoes, qsm)
    # In a derived mask, zero-filled voxels (skull stripping, padding) are dropped without comment.
    n_warn = int(np.count_nonzero(bad & mask & (echoes[..., 0] != 0))) if mask_derived else 0
    if n_warn:
        run.warnings.append(f"{n_warn} voxel(s) with NaN/Inf values or echo 1 < 0 were left out of the mask "
                            "(their maps are 0).")
    mask = mask & ~bad
    if inputs.field_map is not None:
        report(0.03, "Correcting the field gradients")
        echoes, untrusted = fieldmap.correct_echoes(echoes, inputs.field_map, mask, inputs.protocol)
        inputs = dataclasses.replace(inputs, echoes=echoes)
        n_untrusted = int(np.count_nonzero(untrusted))
        if n_untrusted:
            run.warnings.append(
                f"{n_untrusted} voxel(s) ({100 * n_untrusted / max(int(mask.sum()), 1):.1f} % of the mask) were left "
                f"out (their maps are 0): the field map's gradient there takes more than "
                f"{100 * (1 - fieldmap.MIN_DEPHASING):.0f} % of the last echo's signal, or the field is not finite, so "
                "the correction cannot be trusted (near the sinuses and ear canals).")
        mask = mask & ~untrusted
        if n_untrusted and not mask.any():
            raise InputError("The field map's gradients take more than half of the last echo's signal in every "
                             "voxel (or the field is not finite), so no voxel can be corrected: check the field map "
                             f"and its unit ({fieldmap.UNITS_LISTED}).")
    if not mask.any():
        raise InputError("No voxel inside the mask has finite echoes and QSM with echo 1 > 0; nothing to predict.")
    idx = np.flatnonzero(mask)  # C order (z, y, x): the voxel list of sequences.py
    data = _Voxels(inputs, mask, idx)
    run.check_cancel()

    values = predictor.fit(data, run)
    run.check_cancel()

    report(0.97, "Assembling the maps")
    values["OEF"] = (100.0 * physics.oef_from_Y(values["Y"])).astype(np.float32)
    values["quality"] = np.empty(len(idx), dtype=np.float32)
    for a, b in sequences.iter_chunks(len(idx), 65536):
        values["quality"][a:b] = quality_map(data.echo_rows[a:b], data.qsm_rows[a:b],
                                             {p: values[p][a:b] for p in physics.PARAMETER_NAMES}, inputs.protocol)
    run.warnings += plausibility.check_fit(values["quality"])
    if inputs.cbf is not None:
        cbf_rows = np.asarray(inputs.cbf).reshape(-1)[idx].astype(np.float64)
        finite = np.isfinite(cbf_rows)
        if not finite.all():
            run.warnings.append(f"{int((~finite).sum())} voxel(s) with NaN/Inf CBF get CMRO2 0.")
        values["CMRO2"] = np.where(finite, physics.cmro2(np.where(finite, cbf_rows, 0.0),
                                                         values["OEF"] / 100.0), 0.0)
    del data  # the voxel rows are done with; each map's voxel list goes as its volume is made (peak memory)
    volumes = {}
    for name in [n for n in maptable.MAPS if n in values]:  # the table's order
        volume = np.zeros(mask.size, dtype=np.float32)
        volume[idx] = values.pop(name)
        volumes[name] = volume.reshape(mask.shape)
    run.check_cancel()
    elapsed = time.perf_counter() - start
    report(1.0, f"Done: {len(idx)} voxels in {elapsed:.1f} s")
    for w in run.warnings:
        log.warning(w)
    card = predictor.bundle.card if predictor.bundle else None
    return PredictionResult(volumes, mask, run.warnings, elapsed, run.device, card, predictor.method.name,
                            mask_derived, len(idx), mask_source)


def quality_map(echo_rows: np.ndarray, qsm_rows: np.ndarray, params: dict, protocol: physics.Protocol) -> np.ndarray:
    """Normalised RMS residual of the forward model of `params` (definition in the module doc)."""
    signal = physics.qbold_signal(params["S0"], params["R2"], params["Y"], params["v"], params["chi_nb"], protocol)
    chi = physics.qsm_value(params["Y"], params["v"], params["chi_nb"])
    echo1 = echo_rows[:, :1].astype(np.float64)
    echo_term = np.sum(((echo_rows - signal) / echo1) ** 2, axis=1)
    qsm_term = ((qsm_rows - chi) / QSM_RESIDUAL_SCALE_PPM) ** 2
    return np.sqrt((echo_term + qsm_term) / (echo_rows.shape[1] + 1)).astype(np.float32)


# --- The background job (the Slicer module's way to run the engine) -----------------------------
class PredictionJob(BackgroundJob):
    """predict_maps in a background thread (jobs.BackgroundJob: progress events, cancel, one
    result or one error; the rules against races are there).

    job = PredictionJob(inputs); job.start(); ... job.poll_events() from a GUI timer ...;
    job.cancel(); result = job.wait(). A cancel while the model loads stops the job at once (the
    model keeps loading in the background and is cached for the next run).
    """

    thread_name = "OEFPredictionJob"

    def __init__(self, inputs: PredictionInputs, model=None, device: str = "auto",
                 method: str | None = None, **kw):
        super().__init__()
        self.inputs = inputs
        self.model = model
        self.device = device
        self.method = method
        self.kw = kw

    def run_target(self, progress, cancel_event):
        predictor = self.model
        if not isinstance(predictor, Predictor):
            progress(0.0, "Loading the model")
            predictor = call_interruptibly(lambda: Predictor.build(self.inputs.protocol, self.method, self.model),
                                           cancel_event)
        return predict_maps(self.inputs, predictor, self.device, progress=progress, cancel_event=cancel_event,
                            **self.kw)
