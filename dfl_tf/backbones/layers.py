"""Layers shared by backbone builders."""
from __future__ import annotations

import keras
from keras import ops

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
#: Lunit's TCGA statistics (its ViTs and ResNet-50s; kaiko-ai/eva backbones/pathology/lunit.py)
LUNIT_MEAN, LUNIT_STD = (0.70322989, 0.53606487, 0.66096631), (0.21716536, 0.26081574, 0.20723464)
#: What each Preprocess mode does, as `dfl backbones` prints it.
PREPROCESSING = {
    "caffe": "RGB -> BGR, minus the ImageNet mean (103.939, 116.779, 123.68) in BGR order, no scaling (caffe)",
    "torch": "x/255, mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225)",
    "tf": "x/127.5 - 1",
    "unit": "x/255",
    "none": "built into the Keras model ([0, 255] in)",
}


def describe_normalisation(mean: tuple, std: tuple) -> str:
    """``x/255, mean (...), std (...)``: a mean/std normalisation as `dfl backbones` prints it."""
    fmt = lambda v: "(" + ", ".join(f"{x:g}" for x in v) + ")"  # noqa: E731
    return f"x/255, mean {fmt(mean)}, std {fmt(std)}"


@keras.saving.register_keras_serializable(package="dfl_tf")
class Preprocess(keras.layers.Layer):
    """Maps float RGB in [0, 255] to a backbone's expected input.

    Modes: ``caffe`` (BGR, ImageNet mean subtracted; Keras ResNet50), ``torch``
    ([0, 1] then ImageNet mean/std; DenseNet, torchvision-style models), ``tf``
    ([-1, 1]), ``unit`` ([0, 1]), ``none`` (the backbone rescales itself).
    """

    def __init__(self, mode: str = "none", **kwargs):
        super().__init__(**kwargs)
        if mode not in ("caffe", "torch", "tf", "unit", "none"):
            raise ValueError(f"unknown preprocessing mode {mode!r}")
        self.mode = mode

    def call(self, x):
        x = ops.cast(x, self.compute_dtype)
        if self.mode == "caffe":
            x = ops.flip(x, axis=-1) - ops.convert_to_tensor(CAFFE_MEAN_BGR, dtype=x.dtype)
        elif self.mode == "torch":
            mean = ops.convert_to_tensor(IMAGENET_MEAN, dtype=x.dtype)
            std = ops.convert_to_tensor(IMAGENET_STD, dtype=x.dtype)
            x = (x / 255.0 - mean) / std
        elif self.mode == "tf":
            x = x / 127.5 - 1.0
        elif self.mode == "unit":
            x = x / 255.0
        return x

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}


def wrap(base: keras.Model, input_size: int, mode: str, name: str) -> keras.Model:
    """Input [0,255] RGB -> Preprocess(mode) -> base (already pooled) -> float32 features."""
    inputs = keras.Input((input_size, input_size, 3), name="images")
    x = Preprocess(mode, name="preprocess")(inputs)
    x = base(x, training=False)
    x = keras.layers.Activation("linear", dtype="float32", name="embedding")(x)
    return keras.Model(inputs, x, name=name)


@keras.saving.register_keras_serializable(package="dfl_tf")
class Normalize(keras.layers.Layer):
    """Float RGB [0, 255] -> ``(x / 255 - mean) / std`` with a model's own per-channel mean/std."""

    def __init__(self, mean=IMAGENET_MEAN, std=IMAGENET_STD, **kwargs):
        super().__init__(**kwargs)
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)

    def call(self, x):
        x = ops.cast(x, "float32")  # normalise in float32, then drop to the compute dtype
        mean = ops.convert_to_tensor(self.mean, dtype="float32")
        std = ops.convert_to_tensor(self.std, dtype="float32")
        return ops.cast((x / 255.0 - mean) / std, self.compute_dtype)

    def get_config(self):
        return {**super().get_config(), "mean": list(self.mean), "std": list(self.std)}
