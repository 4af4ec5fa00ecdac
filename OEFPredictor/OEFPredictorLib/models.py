"""Keras model builders (the paper's LSTM, the DNN baseline, variants) and model cards.

Keras 3 code only (no backend-specific calls): TensorFlow is the default backend, and the same
.keras file loads under another backend (e.g. torch). A model ships as MODEL.keras plus MODEL.json,
its card: protocol, input normalisation, output scaling, window definition, training data, test
metrics, versions and the SHA-256 of the .keras file. Loading checks the checksum and uses Keras
safe mode (no arbitrary code from a model file).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import zipfile
from pathlib import Path

import numpy as np

from . import decay, physics, sequences
from .errors import InputError

PAPER_LSTM = {"architecture": "lstm", "cell": "lstm", "units": [512, 256, 128, 64], "dense": [64, 32, 16]}
PAPER_DNN = {"architecture": "mlp", "dense": [256, 256, 128]}
# The spatial model: a 3D U-Net in the QQ-NET family (4 levels, two 3x3x3 convolutions per block,
# no normalisation layers, skip concatenation, 1x1x1 head), narrower than QQ-NET (16-128 channels)
# so that a whole 2 mm brain runs in about a second on two CPU cores.
SPATIAL_UNET = {"architecture": "unet", "filters": [16, 32, 64, 128], "convs_per_block": 2}
# The context model (the default spatial method, spatial.py): a fixed Gaussian pyramid of the inputs
# at sigmas_mm, then a per-voxel network (1x1x1 layers) on the pyramid.
# "decay": the protocol-free inputs (decay.py) of the default model; a spec without it is the first
# context model, bound to the paper's protocol.
CONTEXT_NET = {"architecture": "context", "sigmas_mm": [2.0, 4.0, 8.0], "local_noise": True, "dense": [128, 128, 64],
               "decay": decay.spec()}
LEAKY_SLOPE = 0.01
CARD_VERSION = 1


def build_model(spec: dict | None = None, window_length: int = sequences.WINDOW_LENGTH, n_features: int = 9,
                n_outputs: int = 5):
    """Build the network a spec describes (default: the paper's LSTM).

    lstm: Input(L, F) -> recurrent layers (all but the last return sequences) -> Flatten ->
    Dense + LeakyReLU(0.01) ... -> Dense(n_outputs). cell 'lstm' or 'gru'.
    mlp:  Input(L, F) -> Flatten -> Dense + LeakyReLU(0.01) ... -> Dense(n_outputs); with L = 1
    this is the voxelwise DNN of the paper's comparison.
    """
    import keras
    from keras import layers

    spec = dict(PAPER_LSTM if spec is None else spec)
    if spec["architecture"] == "unet":
        return build_unet(spec, n_features, n_outputs)
    if spec["architecture"] == "context":
        return build_context_net(spec, n_features, n_outputs)
    inputs = keras.Input((window_length, n_features), name="voxel_window")
    x = inputs
    if spec["architecture"] == "lstm":
        cell = {"lstm": layers.LSTM, "gru": layers.GRU}[spec.get("cell", "lstm")]
        units = spec["units"]
        for i, width in enumerate(units):
            # tanh / sigmoid: the cuDNN-compatible configuration (GPU speed), as in the paper
            x = cell(width, return_sequences=i < len(units) - 1, name=f"{spec.get('cell', 'lstm')}_{i + 1}")(x)
    elif spec["architecture"] != "mlp":
        raise ValueError(f"Unknown architecture {spec['architecture']!r}; use 'lstm' or 'mlp'.")
    x = layers.Flatten(name="flatten")(x)
    for i, width in enumerate(spec["dense"]):
        x = layers.Dense(width, name=f"dense_{i + 1}")(x)
        x = layers.LeakyReLU(negative_slope=LEAKY_SLOPE, name=f"leaky_relu_{i + 1}")(x)
    outputs = layers.Dense(n_outputs, name="qq_parameters")(x)
    return keras.Model(inputs, outputs, name=spec["architecture"] + "_oef")


def build_unet(spec: dict, n_features: int = 9, n_outputs: int = 7):
    """A fully convolutional 3D U-Net on (z, y, x, channel) volumes of any size divisible by
    2 ** (levels - 1). Upsampling is nearest-neighbour + 1x1x1 convolution (no checkerboard
    artefacts of transposed convolutions); LeakyReLU(0.01) as in the paper's dense layers.
    Plain Keras 3 layers only, so the file loads under any backend and in safe mode."""
    import keras
    from keras import layers

    filters, convs = list(spec["filters"]), int(spec.get("convs_per_block", 2))

    def block(x, width, name):
        for k in range(convs):
            x = layers.Conv3D(width, 3, padding="same", name=f"{name}_conv{k + 1}")(x)
            x = layers.LeakyReLU(negative_slope=LEAKY_SLOPE, name=f"{name}_act{k + 1}")(x)
        return x

    inputs = keras.Input((None, None, None, n_features), name="volume")
    x, skips = inputs, []
    for level, width in enumerate(filters):
        x = block(x, width, f"down{level + 1}")
        if level < len(filters) - 1:
            skips.append(x)
            x = layers.MaxPooling3D(2, name=f"pool{level + 1}")(x)
    for level in reversed(range(len(filters) - 1)):
        width = filters[level]
        x = layers.UpSampling3D(2, name=f"up{level + 1}")(x)
        x = layers.Conv3D(width, 1, name=f"up{level + 1}_conv")(x)
        x = layers.Concatenate(name=f"skip{level + 1}")([x, skips[level]])
        x = block(x, width, f"dec{level + 1}")
    outputs = layers.Conv3D(n_outputs, 1, name="qq_parameters_and_interval")(x)
    return keras.Model(inputs, outputs, name="unet_oef")


def build_context_net(spec: dict, n_features: int, n_outputs: int = 7, feature_mean=None, feature_std=None):
    """The context model's learned part: on (z, y, x, features) volumes of any size, a feature
    normalisation (the training pyramid's mean and SD, stored in the layer), then Dense layers + LeakyReLU
    applied voxel by voxel (as 1x1x1 convolutions). Plain Keras 3 layers: safe-mode loadable."""
    import keras
    from keras import layers

    inputs = keras.Input((None, None, None, n_features), name="context_pyramid")
    mean = np.zeros(n_features) if feature_mean is None else np.asarray(feature_mean, dtype=float)
    std = np.ones(n_features) if feature_std is None else np.asarray(feature_std, dtype=float)
    x = layers.Normalization(axis=-1, mean=mean.tolist(), variance=(std ** 2).tolist(), name="pyramid_scaling")(inputs)
    for i, width in enumerate(spec["dense"]):
        x = layers.Dense(width, name=f"dense_{i + 1}")(x)
        x = layers.LeakyReLU(negative_slope=LEAKY_SLOPE, name=f"leaky_relu_{i + 1}")(x)
    outputs = layers.Dense(n_outputs, name="qq_parameters_and_interval")(x)
    return keras.Model(inputs, outputs, name="context_oef")


# --- Output scaling ---------------------------------------------------------------------------
def fit_output_scaling(targets: np.ndarray) -> dict:
    """Per-parameter z-scoring of the training targets (S0 relative to echo 1, R2, Y, v, chi_nb)."""
    return {"parameters": list(physics.PARAMETER_NAMES), "S0": "relative to the voxel's echo-1 magnitude",
            "mean": [float(x) for x in targets.mean(axis=0)],
            "std": [float(max(x, 1e-6)) for x in targets.std(axis=0)]}


def encode_targets(params: dict, echo1: np.ndarray, scaling: dict) -> np.ndarray:
    """Truth parameters -> scaled network targets (N, 5)."""
    t = np.stack([params["S0"] / echo1 if n == "S0" else params[n] for n in physics.PARAMETER_NAMES], axis=1)
    return ((t - np.array(scaling["mean"])) / np.array(scaling["std"])).astype(np.float32)


def decode_outputs(raw: np.ndarray, echo1: np.ndarray, scaling: dict) -> dict[str, np.ndarray]:
    """Network outputs (N, 5) -> parameters; S0 back in the input's units."""
    values = raw * np.array(scaling["std"], dtype=np.float32) + np.array(scaling["mean"], dtype=np.float32)
    out = {name: values[:, i] for i, name in enumerate(physics.PARAMETER_NAMES)}
    out["S0"] = out["S0"] * echo1
    return out


# --- Model files and cards --------------------------------------------------------------------
def sha256_of(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def card_path_for(model_path: str | Path) -> Path:
    return Path(model_path).with_suffix(".json")


def read_card(model_path: str | Path) -> dict:
    """The model's .json card as written (load_bundle checks it; this only reads it)."""
    return json.loads(card_path_for(model_path).read_text(encoding="utf-8"))


def write_card(model_path: str | Path, card: dict) -> Path:
    """Replace the model's .json card whole and atomically (the model file is left as it is)."""
    path = card_path_for(model_path)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    partial.replace(path)
    return path


def make_card(spec: dict, protocol: physics.Protocol, output_scaling: dict, window_length: int,
              target: str, input_normalisation: dict | None = None, **extra) -> dict:
    import keras

    return {
        "card_version": CARD_VERSION,
        "model": spec,
        "protocol": {"echo_times_s": list(protocol.echo_times), "echo_times_ms": protocol.echo_times_ms,
                     "field_strength_T": protocol.field_strength},
        "input_normalisation": dict(input_normalisation or sequences.DEFAULT_INPUT_NORMALISATION),
        "output_scaling": output_scaling,
        "window": {"length": window_length, "target": target, "order": "in-mask voxels, C order (z, y, x)",
                   "padding": "edge"},
        "versions": {"keras": keras.__version__, "backend": keras.backend.backend()},
        **extra,
    }


def save_bundle(model, card: dict, path: str | Path) -> Path:
    """Write MODEL.keras and its card MODEL.json (with the file's SHA-256)."""
    path = Path(path)
    if path.suffix != ".keras":
        raise InputError(f"{path}: a model file must end in .keras.")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial.keras")
    model.save(tmp)
    tmp.replace(path)
    write_card(path, dict(card, sha256=sha256_of(path), file=path.name))
    return path


@dataclasses.dataclass
class ModelBundle:
    """A loaded model with its card."""

    model: object  # keras.Model
    card: dict
    path: Path

    @property
    def protocol(self) -> physics.Protocol:
        p = self.card["protocol"]
        return physics.Protocol(tuple(p["echo_times_s"]), p["field_strength_T"])

    @property
    def window_length(self) -> int:
        return int(self.card["window"]["length"])

    @property
    def window_target(self) -> str:
        return self.card["window"]["target"]

    @property
    def qsm_scale(self) -> float:
        return float(self.card["input_normalisation"]["qsm_scale"])

    @property
    def output_scaling(self) -> dict:
        return self.card["output_scaling"]

    @property
    def protocol_range(self) -> "decay.ProtocolRange | None":
        """The protocols a model reads (None: only its card's protocol): a protocol-free model's, or the range a
        model trained on one protocol reads by resampling other decays to it (decay.resample_echoes)."""
        supported = self.card.get("supported_protocols")
        return decay.ProtocolRange.from_dict(supported) if supported else None

    @property
    def expected_protocol(self) -> physics.Protocol | None:
        """The one protocol data must have (None for a model that reads a range of protocols)."""
        return None if self.protocol_range else self.protocol

    def check_protocol(self, protocol: physics.Protocol) -> None:
        """Refuse data whose protocol the model does not support, saying what differs and what to do."""
        if self.protocol_range:
            self.protocol_range.check(protocol, self.path.name)
            return
        mine = self.protocol
        if protocol.matches(mine):
            return
        fix = "Give exactly those echoes (milliseconds on the command line)"
        if protocol.n_echoes != mine.n_echoes:
            what = "number of echoes"
        elif np.allclose(protocol.te, mine.te, rtol=1e-3, atol=1e-6):
            what, fix = "field strength", "Check the field strength (MagneticFieldStrength in the sidecar)"
        else:
            what = "echo times"
        raise InputError(f"The data's protocol ({protocol.describe()}) differs in its {what} from the model's "
                         f"({mine.describe()}, {self.path.name}). {fix}, or use a model trained for your "
                         "protocol (oefpredictor train).")


def card_problem(card) -> str | None:
    """What is missing or malformed in a model card (None when it is usable): every field the
    engine reads, checked once here, so that a bad card is one clear error, not a traceback later."""
    def numbers(value, n=None, positive=False):
        ok = (isinstance(value, list) and (n is None or len(value) == n) and len(value) > 0
              and all(isinstance(x, (int, float)) and not isinstance(x, bool) and np.isfinite(x) for x in value))
        return ok and (not positive or all(x > 0 for x in value))

    if not isinstance(card, dict):
        return "it is not a JSON object"
    missing = [k for k in ("protocol", "input_normalisation", "output_scaling", "window", "sha256") if k not in card]
    if missing:
        return f"'{missing[0]}' is missing"
    p, norm, scaling, window = card["protocol"], card["input_normalisation"], card["output_scaling"], card["window"]
    if not (isinstance(p, dict) and numbers(p.get("echo_times_s"), positive=True)
            and numbers([p.get("field_strength_T")], positive=True)):
        return "'protocol' needs echo_times_s (a list of seconds) and field_strength_T"
    try:
        physics.Protocol(tuple(p["echo_times_s"]), p["field_strength_T"])
    except ValueError as exc:
        return f"'protocol': {exc}"
    if not (isinstance(norm, dict) and numbers([norm.get("qsm_scale")], positive=True)):
        return "'input_normalisation' needs a positive qsm_scale"
    n = len(physics.PARAMETER_NAMES)
    if not (isinstance(scaling, dict) and numbers(scaling.get("mean"), n)
            and numbers(scaling.get("std"), n, positive=True)):
        return (f"'output_scaling' needs 'mean' and 'std' lists of {n} numbers (std > 0), one per parameter "
                f"({', '.join(physics.PARAMETER_NAMES)})")
    if not isinstance(window, dict):
        return "'window' must be an object with 'length' and 'target'"
    spec = card.get("model") if isinstance(card.get("model"), dict) else {}
    if spec.get("architecture", "lstm") in ("lstm", "mlp"):  # the voxel-window models
        length = window.get("length")
        if not (isinstance(length, int) and not isinstance(length, bool) and length >= 1):
            return "'window' needs 'length', a positive whole number of voxels"
        if window.get("target") not in sequences.TARGETS:
            return f"'window' needs 'target', one of {', '.join(sequences.TARGETS)}"
    if not isinstance(card["sha256"], str):
        return "'sha256' must be the model file's checksum (text)"
    return None


def load_bundle(path: str | Path | None = None) -> ModelBundle:
    """Load MODEL.keras (default: the bundled model) after checking its card and checksum."""
    from . import resources

    if path is None:
        try:
            path = resources.bundled_model_path()
        except FileNotFoundError as exc:
            raise InputError(str(exc)) from None
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such model file.")
    card_file = card_path_for(path)
    if not card_file.exists():
        raise InputError(f"{path}: its model card {card_file.name} is missing; a model needs its card "
                         "(protocol, normalisation). Keep MODEL.keras and MODEL.json together.")
    try:
        card = json.loads(card_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"{card_file}: not a readable model card ({exc}).") from None
    problem = card_problem(card)
    if problem:
        raise InputError(f"{card_file}: not a valid model card: {problem}. Use the card that "
                         "`oefpredictor train` wrote with the model.")
    digest = sha256_of(path)
    if digest != card["sha256"]:
        raise InputError(f"{path}: checksum mismatch with its card (file corrupt or replaced). "
                         "Re-copy the model file with its card.")
    if not zipfile.is_zipfile(path):  # Keras would say "File not found"
        raise InputError(f"{path}: not a Keras model archive (a .keras file is a zip archive; this file is not: "
                         "damaged, or another format). Use the .keras file that `oefpredictor train` wrote.")
    import keras

    try:
        model = keras.saving.load_model(path, compile=False, safe_mode=True)
    except Exception as exc:  # Keras raises many types for a bad archive
        text = " ".join(str(exc).split())
        if "arbitrary code" in text or "safe_mode" in text:
            raise InputError(f"{path}: refused by Keras safe mode: the model holds Python code (e.g. a Lambda "
                             "layer) that could run anything on this computer, so it is not loaded. Use a model "
                             "of standard Keras layers, as `oefpredictor train` saves.") from None
        raise InputError(f"{path}: not a loadable Keras model ({type(exc).__name__}: {text[:400]}).") from None
    return ModelBundle(model, card, path)
