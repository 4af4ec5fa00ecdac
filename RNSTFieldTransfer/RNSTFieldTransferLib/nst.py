"""Gatys neural style transfer on VGG16 features, as RNST uses it.

Features are taken after each convolution, before its ReLU. Content loss at conv2_2 against the
original low-field image; style loss at conv1_1, conv1_2, conv2_1, conv2_2, conv3_1, conv3_2,
conv3_3, conv4_1 against the style image; Gram matrix G = F F^T / (C H W); both losses L1 (mean
absolute difference), style summed over its layers; total = 5000 style + 1 content.

The network and losses use keras.ops (backend-agnostic); the gradients for L-BFGS use TensorFlow.
scipy's L-BFGS-B drives the optimisation (bounds [0, 1]); the published code's learning rate 0.4
belongs to PyTorch's L-BFGS and has no counterpart here: scipy's line search sets the step.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from .errors import RNSTCancelled

CONTENT_LAYER = "conv2_2"
STYLE_LAYERS = ("conv1_1", "conv1_2", "conv2_1", "conv2_2",
                "conv3_1", "conv3_2", "conv3_3", "conv4_1")
STYLE_WEIGHT = 5000.0
CONTENT_WEIGHT = 1.0
# Caffe ImageNet means, BGR order; a grey image has equal channels, so only the means matter.
CAFFE_BGR_MEANS = (103.939, 116.779, 123.68)


def keras_layer_name(paper_name: str) -> str:
    """conv2_2 (paper) -> block2_conv2 (Keras)."""
    block, index = paper_name[4:].split("_")
    return f"block{block}_conv{index}"


# ---------------------------------------------------------------------------------------------
# Losses (keras.ops; the tests check them against hand-computed values)

def gram_matrix(features):
    """G = F F^T / (C H W) for features (H, W, C) or (1, H, W, C)."""
    from keras import ops
    if len(features.shape) == 4:
        features = features[0]
    h, w, c = features.shape
    f = ops.reshape(ops.transpose(features, (2, 0, 1)), (c, h * w))
    return ops.matmul(f, ops.transpose(f)) / float(c * h * w)


def l1(a, b):
    from keras import ops
    return ops.mean(ops.abs(a - b))


def content_loss(features, target):
    return l1(features, target)


def style_loss(features_list, target_grams):
    """Sum over the style layers of the L1 distance between Gram matrices."""
    total = 0.0
    for feats, gram in zip(features_list, target_grams):
        total = total + l1(gram_matrix(feats), gram)
    return total


# ---------------------------------------------------------------------------------------------
# The network

def build_vgg16_features(weights: dict, layers=(CONTENT_LAYER,) + STYLE_LAYERS):
    """Keras model: grey image (1, H, W, 1) in [0, 1] -> pre-ReLU features of `layers` (in the
    order given). Only the convolutions up to the deepest layer asked for are built."""
    import keras
    from keras import ops

    from .weights import VGG16_CONV_LAYERS

    wanted = [keras_layer_name(n) for n in layers]
    order = [name for name, _, _ in VGG16_CONV_LAYERS]
    last = max(order.index(n) for n in wanted)

    inp = keras.Input(shape=(None, None, 1), name="image01")
    # To VGG16's input convention: 0-255, BGR, minus the Caffe means; grey -> 3 channels.
    means = ops.reshape(ops.convert_to_tensor(CAFFE_BGR_MEANS, dtype="float32"), (1, 1, 1, 3))
    x = ops.repeat(inp * 255.0, 3, axis=-1) - means
    outputs = {}
    current_block = 1
    for name, _, cout in VGG16_CONV_LAYERS[:last + 1]:
        block = int(name[5])
        if block != current_block:
            x = keras.layers.MaxPooling2D(2, name=f"block{current_block}_pool")(x)
            current_block = block
        conv = keras.layers.Conv2D(cout, 3, padding="same", name=name)
        z = conv(x)
        conv.set_weights([weights[f"{name}/kernel"], weights[f"{name}/bias"]])
        outputs[name] = z
        x = ops.relu(z)
    return keras.Model(inp, [outputs[n] for n in wanted], name="vgg16_preactivation_features")


@dataclass
class NSTResult:
    images: list          # best-so-far image at each requested evaluation budget
    losses: list          # their losses
    evaluations: int


class StyleTransfer:
    """Loss and gradient of one NST problem (fixed content and style images).

    `model` comes from build_vgg16_features with layers (content,) + style layers.
    """

    def __init__(self, model, content: np.ndarray, style: np.ndarray,
                 style_weight: float = STYLE_WEIGHT, content_weight: float = CONTENT_WEIGHT):
        import tensorflow as tf
        from keras import ops

        self.model = model
        self.shape = content.shape
        self.style_weight = float(style_weight)
        self.content_weight = float(content_weight)
        c_feats = model(_as_batch(content))
        s_feats = model(_as_batch(style))
        self.content_target = c_feats[0]
        self.style_grams = [gram_matrix(f) for f in s_feats[1:]]

        def losses(x):
            feats = self.model(x)
            lc = content_loss(feats[0], self.content_target)
            ls = style_loss(feats[1:], self.style_grams)
            return self.style_weight * ls + self.content_weight * lc, ls, lc

        @tf.function
        def value_and_grad(x):
            with tf.GradientTape() as tape:
                tape.watch(x)
                total, _, _ = losses(x)
            return total, tape.gradient(total, x)

        self._losses = tf.function(losses)
        self._value_and_grad = value_and_grad
        self._ops = ops

    def loss(self, image: np.ndarray) -> float:
        """Total loss (5000 style + content) of one image."""
        total, _, _ = self._losses(_as_batch(image))
        return float(total)

    def loss_terms(self, image: np.ndarray) -> tuple[float, float, float]:
        total, ls, lc = self._losses(_as_batch(image))
        return float(total), float(ls), float(lc)

    def run(self, start: np.ndarray, budgets=(500, 600, 700),
            cancel: threading.Event | None = None, on_eval=None) -> NSTResult:
        """L-BFGS-B from `start`; the best image seen after each budget of loss evaluations.

        One run to max(budgets), read at each budget: the same as separate runs with those
        budgets from the same start (L-BFGS is deterministic), at the cost of the longest one.
        """
        from scipy.optimize import minimize

        budgets = sorted(int(b) for b in budgets)
        state = {"n": 0, "best": np.inf, "best_x": start.astype(np.float64).ravel().copy()}
        snapshots, snap_losses = [], []

        def fun(flat):
            if cancel is not None and cancel.is_set():
                raise RNSTCancelled("cancelled during style transfer")
            x = flat.reshape(self.shape).astype(np.float32)
            value, grad = self._value_and_grad(_as_batch(x))
            value = float(value)
            state["n"] += 1
            if value < state["best"]:
                state["best"], state["best_x"] = value, flat.copy()
            while len(snapshots) < len(budgets) and state["n"] >= budgets[len(snapshots)]:
                snapshots.append(state["best_x"].reshape(self.shape).astype(np.float32))
                snap_losses.append(state["best"])
            if on_eval is not None:
                on_eval(state["n"])
            return value, np.asarray(grad, np.float64).ravel()

        minimize(fun, start.astype(np.float64).ravel(), jac=True, method="L-BFGS-B",
                 bounds=[(0.0, 1.0)] * start.size,
                 options={"maxfun": budgets[-1], "maxiter": budgets[-1], "ftol": 0.0,
                          "gtol": 0.0, "maxcor": 20})
        # Converged (or stopped) early: the remaining budgets get the best image found.
        while len(snapshots) < len(budgets):
            snapshots.append(state["best_x"].reshape(self.shape).astype(np.float32))
            snap_losses.append(state["best"])
        return NSTResult(snapshots, snap_losses, state["n"])


def _as_batch(image: np.ndarray):
    return np.asarray(image, np.float32)[None, :, :, None]
