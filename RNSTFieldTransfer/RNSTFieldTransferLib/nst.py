"""Gatys neural style transfer on CNN features, as RNST uses it.

Published set-up (Shen et al.'s code, net/style_transfer.py): torchvision VGG16 on RGB images in
[0, 1] normalised by the ImageNet mean and std; features after each convolution, before its ReLU;
content loss at conv2_2 (their `conv_4`) against the original low-field image; style loss at
conv1_1 .. conv4_1 (`conv_1` .. `conv_8`) against the style image; Gram matrix G = F F^T / (C H W);
both losses L1 (mean absolute difference), style summed over its layers; total = 5000 style + 1
content. The default backbone here is that network with those weights, so the published loss
weights apply unchanged.

Other backbones use Keras' Caffe convention (BGR, 0-255, minus the channel means). Their features
are larger, and the style term (Gram matrices, quadratic in the features) grows faster than the
content term (linear): with the same 5000:1 weights the style term would weigh about
CAFFE_STYLE_RESCALE times more than in the published set-up. Their style weight is divided by
that factor (measured on MRI slices, see CAFFE_STYLE_RESCALE).

The network and losses use keras.ops; the gradients use TensorFlow (CPU, or a CUDA GPU when
TensorFlow sees one). scipy's L-BFGS-B drives the optimisation (bounds [0, 1]); PyTorch's L-BFGS
with lr 0.4 and no line search, as published, has no scipy counterpart: scipy's line search sets
the step.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from .errors import RNSTCancelled, RNSTInputError

STYLE_WEIGHT = 5000.0
CONTENT_WEIGHT = 1.0
TORCH_RGB_MEAN = (0.485, 0.456, 0.406)
TORCH_RGB_STD = (0.229, 0.224, 0.225)
CAFFE_BGR_MEANS = (103.939, 116.779, 123.68)
# Ratio of (style loss / content loss) between Keras' Caffe VGG16 and torchvision's VGG16 on the
# same images: median 81 (56 to 123) over 12 MRI slices (benchmarks/rnst_caffe_scale.py).
CAFFE_STYLE_RESCALE = 80.0


@dataclass(frozen=True)
class Backbone:
    name: str
    convention: str          # "torch" (RGB, ImageNet mean/std) or "caffe" (BGR, 0-255, means)
    content_layer: str
    style_layers: tuple
    style_weight: float
    content_weight: float = CONTENT_WEIGHT


VGG16_STYLE = ("block1_conv1", "block1_conv2", "block2_conv1", "block2_conv2",
               "block3_conv1", "block3_conv2", "block3_conv3", "block4_conv1")
VGG16_TORCH = Backbone("vgg16", "torch", "block2_conv2", VGG16_STYLE, STYLE_WEIGHT)
VGG16_CAFFE = Backbone("vgg16", "caffe", "block2_conv2", VGG16_STYLE,
                       STYLE_WEIGHT / CAFFE_STYLE_RESCALE)
# ResNet: the paper reports ResNet backbones but publishes no layer choice. The analogue of the
# VGG16 choice, before the ReLUs: the stem convolution and the residual sums of stages 2 and 3
# (style), the end of stage 2 (content). Keras' Caffe convention, hence the same rescaling.
RESNET_STYLE = ("conv1_conv", "conv2_block1_add", "conv2_block2_add", "conv2_block3_add",
                "conv3_block1_add", "conv3_block2_add", "conv3_block3_add", "conv3_block4_add")
BACKBONES = ("vgg16", "resnet50", "resnet152")


def backbone_spec(name: str, convention: str = "torch") -> Backbone:
    if name == "vgg16":
        return VGG16_TORCH if convention == "torch" else VGG16_CAFFE
    if name in ("resnet50", "resnet152"):
        return Backbone(name, "caffe", "conv2_block3_add", RESNET_STYLE,
                        STYLE_WEIGHT / CAFFE_STYLE_RESCALE)
    raise RNSTInputError(f"unknown backbone {name!r}: choose one of {', '.join(BACKBONES)}")


# ---------------------------------------------------------------------------------------------
# Losses (keras.ops; the tests check them against hand-computed values)

def gram_matrix(features):
    """G = F F^T / (C H W) for features (H, W, C), or (B, H, W, C) -> one Gram per image
    (B, C, C). H and W may be unknown until run time (one TensorFlow trace serves slices of
    several sizes)."""
    from keras import ops
    single = len(features.shape) == 3
    if single:
        features = features[None]
    c = features.shape[-1]
    f = ops.reshape(features, (ops.shape(features)[0], -1, c))     # (B, HW, C)
    n = ops.cast(ops.shape(f)[1], f.dtype) * float(c)
    g = ops.matmul(ops.transpose(f, (0, 2, 1)), f) / n
    return g[0] if single else g


def l1(a, b):
    """Mean absolute difference; per image (first axis) when given a batch."""
    from keras import ops
    return ops.mean(ops.abs(a - b))


def _l1_per_image(a, b):
    from keras import ops
    d = ops.abs(a - b)
    return ops.mean(ops.reshape(d, (ops.shape(d)[0], -1)), axis=1)


def content_loss(features, target):
    """L1; features (H, W, C) -> a number, (B, H, W, C) -> one per image."""
    return _l1_per_image(features, target) if len(features.shape) == 4 else l1(features, target)


def style_loss(features_list, target_grams):
    """Sum over the style layers of the L1 distance between Gram matrices (one per image for
    batched features (B, H, W, C) and targets (B, C, C))."""
    total = 0.0
    for feats, gram in zip(features_list, target_grams):
        g = gram_matrix(feats)
        total = total + (_l1_per_image(g, gram) if len(g.shape) == 3 else l1(g, gram))
    return total


# ---------------------------------------------------------------------------------------------
# The networks: grey image (1, H, W, 1) in [0, 1] -> [content features] + style features

def _preprocess(inp, convention: str):
    """Grey [0, 1] -> the 3-channel input the backbone was trained on."""
    from keras import ops
    x = ops.repeat(inp, 3, axis=-1)
    if convention == "torch":
        mean = ops.reshape(ops.convert_to_tensor(TORCH_RGB_MEAN, dtype="float32"), (1, 1, 1, 3))
        std = ops.reshape(ops.convert_to_tensor(TORCH_RGB_STD, dtype="float32"), (1, 1, 1, 3))
        return (x - mean) / std
    means = ops.reshape(ops.convert_to_tensor(CAFFE_BGR_MEANS, dtype="float32"), (1, 1, 1, 3))
    return x * 255.0 - means


def build_vgg16_features(weights: dict, backbone: Backbone = VGG16_TORCH):
    """VGG16 up to the deepest layer asked for; outputs pre-ReLU features."""
    import keras
    from keras import ops

    from .weights import VGG16_CONV_LAYERS

    wanted = [backbone.content_layer, *backbone.style_layers]
    order = [name for name, _, _ in VGG16_CONV_LAYERS]
    last = max(order.index(n) for n in wanted)
    inp = keras.Input(shape=(None, None, 1), name="image01")
    x = _preprocess(inp, backbone.convention)
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
    return keras.Model(inp, [outputs[n] for n in wanted], name=f"{backbone.name}_features")


def build_resnet_features(backbone: Backbone, weights_path=None, include_top: bool = False):
    """Keras ResNet50/152 with a verified application weights file (None: random weights, for
    tests of the code path only)."""
    import keras
    make = {"resnet50": keras.applications.ResNet50,
            "resnet152": keras.applications.ResNet152}[backbone.name]
    base = make(include_top=False, weights=None, input_shape=(None, None, 3))
    if weights_path is not None:
        if include_top:  # the file holds the classifier too: load it whole, copy by layer name
            full = make(include_top=True, weights=str(weights_path))
            for layer in base.layers:
                if layer.weights:
                    layer.set_weights(full.get_layer(layer.name).get_weights())
        else:
            base.load_weights(str(weights_path))
    wanted = [backbone.content_layer, *backbone.style_layers]
    features = keras.Model(base.input, [base.get_layer(n).output for n in wanted])
    inp = keras.Input(shape=(None, None, 1), name="image01")
    return keras.Model(inp, features(_preprocess(inp, backbone.convention)),
                       name=f"{backbone.name}_features")


def build_model(backbone_name: str = "vgg16", weights_path=None):
    """(Keras feature model, Backbone) from the default weights or a user's Keras file."""
    from . import weights as w
    if weights_path:
        name, top = w.identify_keras_file(weights_path)
        if name != backbone_name:
            raise RNSTInputError(f"weights file {weights_path} holds {name} weights, but the "
                                 f"backbone is {backbone_name}: choose --backbone {name}")
        if name == "vgg16":
            spec = backbone_spec("vgg16", "caffe")
            return build_vgg16_features(w.keras_vgg16_weights(weights_path, top), spec), spec
        spec = backbone_spec(name)
        return build_resnet_features(spec, weights_path, top), spec
    if backbone_name != "vgg16":
        raise RNSTInputError(f"backbone {backbone_name} needs its Keras ImageNet weights file "
                             f"(--weights {backbone_name}_weights_tf_dim_ordering_tf_kernels_"
                             "notop.h5); no ResNet weights are installed with this tool")
    return build_vgg16_features(w.load_default_vgg16(), VGG16_TORCH), VGG16_TORCH


def compute_device() -> str:
    """Where TensorFlow runs the network: 'GPU (name)' or 'CPU'."""
    import tensorflow as tf
    gpus = tf.config.list_logical_devices("GPU")
    return f"GPU ({gpus[0].name})" if gpus else "CPU"


# Slices optimised together on a GPU (one batch through the network per evaluation). Estimated,
# not measured (no GPU here): 16 slices of 256 x 256 through VGG16 to conv4_1 with gradients
# hold about 16 x 16 M activations, 1 to 4 GB.
GPU_SLICES_PER_BATCH = 16


def slices_per_batch() -> int:
    """How many slices to run together: a batch on a GPU; one at a time on a CPU, where a batch
    is no faster (the cores are busy either way)."""
    return GPU_SLICES_PER_BATCH if compute_device().startswith("GPU") else 1


@dataclass
class NSTResult:
    images: list          # best-so-far image (or batch of images) at the end of each budget
    losses: list          # their losses (one per image of a batch)
    evaluations: int


_COMPILED = {}  # (id(model), weights) -> TensorFlow functions, traced once per image shape


def _compiled(model, style_weight: float, content_weight: float):
    """Loss and gradient functions taking the targets as arguments, so that every slice of a
    volume (same shape) reuses one trace instead of tracing the network again. Losses are per
    image of the batch; the gradient is that of their sum (the images are independent)."""
    import tensorflow as tf
    key = (id(model), style_weight, content_weight)
    if key in _COMPILED and _COMPILED[key][0] is model:
        return _COMPILED[key][1:]

    def losses(x, content_target, style_grams):
        feats = model(x)
        lc = content_loss(feats[0], content_target)
        ls = style_loss(feats[1:], style_grams)
        return style_weight * ls + content_weight * lc, ls, lc

    @tf.function(reduce_retracing=True)
    def value_and_grad(x, content_target, style_grams):
        with tf.GradientTape() as tape:
            tape.watch(x)
            total, _, _ = losses(x, content_target, style_grams)
            summed = tf.reduce_sum(total)
        return total, tape.gradient(summed, x)

    fns = (tf.function(losses, reduce_retracing=True), value_and_grad)
    if len(_COMPILED) >= 2:  # a few models at most: an old model's traces are freed
        del _COMPILED[next(iter(_COMPILED))]
    _COMPILED[key] = (model, *fns)
    return fns


class StyleTransfer:
    """Loss and gradient of NST problems with fixed content and style images: one 2D content
    image, or a batch (B, H, W) of them (slices of one volume, run together on a GPU), each
    with its own style image (any size; a list, or one for all).

    `model` comes from build_model / build_vgg16_features for `backbone` (its loss weights).
    The images of a batch are independent problems: their losses are kept apart, and L-BFGS
    runs on their sum.
    """

    def __init__(self, model, content: np.ndarray, style, backbone: Backbone = VGG16_TORCH):
        import tensorflow as tf
        self.model = model
        content = np.asarray(content, np.float32)
        self.single = content.ndim == 2
        contents = content[None] if self.single else content
        styles = [style] if isinstance(style, np.ndarray) and style.ndim == 2 else list(style)
        if len(styles) == 1:
            styles = styles * len(contents)
        if len(styles) != len(contents):
            raise RNSTInputError(f"{len(contents)} content images but {len(styles)} styles")
        self.shape = contents.shape
        self.content_target = model(contents[..., None])[0]
        per_style = [[gram_matrix(f)[0] for f in model(_as_batch(s))[1:]] for s in styles]
        self.style_grams = [tf.stack(layer) for layer in zip(*per_style)]
        losses, value_and_grad = _compiled(model, float(backbone.style_weight),
                                           float(backbone.content_weight))
        self._losses = lambda x: losses(x, self.content_target, self.style_grams)
        self._value_and_grad = lambda x: value_and_grad(x, self.content_target, self.style_grams)

    def _batch(self, images):
        return np.asarray(images, np.float32).reshape(self.shape)[..., None]

    def _out(self, values):
        values = np.asarray(values, np.float64)
        return float(values[0]) if self.single else values

    def loss(self, image: np.ndarray):
        """Total loss (weighted style + content): a number for one image, one per image of a
        batch."""
        total, _, _ = self._losses(self._batch(image))
        return self._out(total)

    def loss_terms(self, image: np.ndarray):
        total, ls, lc = self._losses(self._batch(image))
        return self._out(total), self._out(ls), self._out(lc)

    def run(self, start: np.ndarray, budgets=(500, 600, 700),
            cancel: threading.Event | None = None, on_eval=None) -> NSTResult:
        """L-BFGS-B from `start` for budgets[0] loss evaluations, then budgets[1] more, ...;
        the best image seen at the end of each (per image of a batch).

        As published: there the candidates come from one image optimised in place, each call
        continuing where the last one stopped (500, then 600 more, then 700 more steps). Here
        it is one L-BFGS run read at the cumulative counts (the published code restarts
        PyTorch's L-BFGS, and its memory, at each call).
        """
        from scipy.optimize import minimize

        budgets = [int(b) for b in np.cumsum([int(b) for b in budgets])]
        start = np.asarray(start, np.float64).reshape(self.shape)
        state = {"n": 0, "best": np.full(self.shape[0], np.inf), "best_x": start.copy()}
        snapshots, snap_losses = [], []

        def keep():
            images = state["best_x"].astype(np.float32)
            snapshots.append(images[0] if self.single else images)
            snap_losses.append(self._out(state["best"]))

        def fun(flat):
            if cancel is not None and cancel.is_set():
                raise RNSTCancelled("cancelled during style transfer")
            x = flat.reshape(self.shape)
            values, grad = self._value_and_grad(self._batch(x))
            values = np.asarray(values, np.float64)
            state["n"] += 1
            better = values < state["best"]  # each image keeps its own best
            state["best"][better] = values[better]
            state["best_x"][better] = x[better]
            while len(snapshots) < len(budgets) and state["n"] >= budgets[len(snapshots)]:
                keep()
            if on_eval is not None:
                on_eval(state["n"])
            return float(values.sum()), np.asarray(grad, np.float64).ravel()

        minimize(fun, start.ravel(), jac=True, method="L-BFGS-B",
                 bounds=[(0.0, 1.0)] * start.size,
                 options={"maxfun": budgets[-1], "maxiter": budgets[-1], "ftol": 0.0,
                          "gtol": 0.0, "maxcor": 20})
        # Converged (or stopped) early: the remaining budgets get the best images found.
        while len(snapshots) < len(budgets):
            keep()
        return NSTResult(snapshots, snap_losses, state["n"])


def _as_batch(image: np.ndarray):
    return np.asarray(image, np.float32)[None, :, :, None]
