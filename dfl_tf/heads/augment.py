"""Feature-space augmentations for heads trained on frozen embeddings.

Each augmentation is switched on by an entry of the ``augment`` list (config or
:func:`dfl_tf.train_head`), and they compose in the order given::

    augment: [{name: noise, std: 0.1}, {name: feature-dropout, rate: 0.1}, {name: mixup, alpha: 0.2}]

* ``noise`` (``std``, default 0.1): isotropic Gaussian noise added to the *standardised*
  embedding (the paper's augmentation); ``std`` in [0, 1]. ``keras.layers.GaussianNoise``.
* ``scaled-noise`` (``std``): Gaussian noise whose per-dimension std is ``std`` times that
  feature's std on the training set, added to the *raw* embedding, i.e. before
  standardisation. After standardisation this is the same distribution as ``noise`` for every
  feature with a non-negligible std; it differs only for (near-)constant features, which it
  leaves untouched while ``noise`` perturbs them. :class:`ScaledFeatureNoise`.
* ``feature-dropout`` (``rate``): zeroes a random fraction of the standardised features (i.e.
  replaces them by the training mean) with the usual 1/(1-rate) rescaling.
  ``keras.layers.Dropout``.
* ``mixup`` (``alpha``): batch-level mixup of embeddings and one-hot labels with
  lambda ~ Beta(alpha, alpha), done in the tf.data training pipeline (:func:`mixup_batch`),
  so it never touches the saved model.

The layers are the identity at inference (``training=False``). ``noise`` and
``feature-dropout`` are Keras built-ins, so a head without ``scaled-noise`` loads with plain
``keras.saving.load_model`` (no ``dfl_tf`` import); :class:`FeatureNoise` and
:class:`FeatureDropout` remain registered aliases so that older ``head.keras`` files load.

Sampling (``noise``'s ``sampler``): drawing ``dim`` fresh Gaussian numbers per embedding and
step costs about as much as the head's matmuls on CPU, so by default (``sampler: table``) the
noise comes from :func:`table_noise`: a fixed table of N(0, 1) draws (:func:`noise_table`, 2^22
numbers, 16 MB, for dim up to 4,096) is read as one flat sequence, and the batch's vectors are
consecutive windows of ``dim`` numbers from a random offset per batch (a multiple of 16, so the
slice shares the table's memory when ``batch x dim`` is one too), with one random sign per batch
(after the shared noise table of OpenAI's evolution strategies). The noise layer reads a copy of the
table pre-multiplied by its std (:func:`add_table_noise`), so its draw is one add (or subtract) over
the batch; each vector is a pick among ``2 x (2^22 - batch x dim) / 16`` fixed vectors (about
460,000 at batch 256 and dim 2,048) whose entries are independent Gaussian draws, and the vectors
of one batch share no numbers. Draws larger than the table (e.g. the larger batched
cross-validation fits) take a random table row per vector, cyclically shifted by a random offset
per batch. ``sampler: exact`` draws fresh numbers instead
(:func:`gaussian_noise`: Box-Muller on philox uniforms as vectorised tensor ops, about half the
cost of ``tf.random.stateless_normal``). The accuracy of the two is compared in
``benchmarks/results.md`` (heads study). The noise layers that :func:`augment_layers` builds are
Keras built-ins whose training call is switched (:func:`use_fast_sampler`), so the saved model
stays plain Keras; the seed stream is the layer's own ``SeedGenerator``.
"""
from __future__ import annotations

from typing import Any, Iterable, Sequence

import keras
import numpy as np
import tensorflow as tf

from dfl_tf.errors import DflError

#: name -> default parameters
AUGMENTATIONS: dict[str, dict[str, float | str]] = {
    "noise": {"std": 0.1, "sampler": "table"},
    "scaled-noise": {"std": 0.1, "sampler": "table"},
    "feature-dropout": {"rate": 0.1},
    "mixup": {"alpha": 0.2},
}
DEFAULT_NOISE = 0.1
SAMPLERS = ("table", "exact")  # the noise samplers: table_noise, gaussian_noise
NOISE_TABLE_FLOATS = 1 << 22  # size of the noise table (16 MB of float32; at least 1,024 rows)
_ALIGN = 16  # window offsets: multiples of 64 bytes, so that a slice of the table is not a copy
_tables: dict[tuple[int, float, str], tf.Variable] = {}


def check_sampler(sampler: str, what: str = "noise sampler") -> None:
    """Refuse a sampler name that is not one of :data:`SAMPLERS` (``what`` names it in the error)."""
    if sampler not in SAMPLERS:
        raise DflError(f"{what} must be one of {', '.join(SAMPLERS)}, got {sampler!r}")


def gaussian_noise(shape: Any, seed: Any, stddev: float = 1.0, dtype: Any = tf.float32) -> tf.Tensor:
    """``stddev`` x N(0, 1) samples of ``shape``, a pure function of the int ``[2]`` ``seed``.

    Box-Muller with both outputs of each pair used: ``u, v`` uniform in [0, 1) (philox, 23-bit,
    ``tf.random.stateless_uniform``), ``r = stddev * sqrt(-2 log(1 - u))``, samples ``r cos(2 pi v)``
    and ``r sin(2 pi v)``; every element comes from its own uniforms (no reuse, no correlation
    beyond the independent pair partners of Box-Muller). The tail ends at about 5.6 std, as in
    TensorFlow's normal kernel, which uses the same transform on the same 23-bit uniforms.
    """
    shape = tf.convert_to_tensor(shape, tf.int32)
    n = tf.reduce_prod(shape)
    half = (n + 1) // 2
    u = tf.random.stateless_uniform(tf.stack([2, half]), tf.cast(seed, tf.int64), dtype=tf.float32)
    r = tf.sqrt(tf.math.log(1.0 - u[0]) * (-2.0 * float(stddev) ** 2))
    theta = u[1] * (2.0 * np.pi)
    z = tf.concat([r * tf.cos(theta), r * tf.sin(theta)], 0)[:n]
    return tf.cast(tf.reshape(z, shape), dtype)


def noise_table(dim: int, scale: float = 1.0) -> tf.Variable:
    """The fixed ``[rows, dim]`` table of N(0, 1) float32 numbers :func:`table_noise` draws from:
    ``rows = max(1024, NOISE_TABLE_FLOATS // dim)``, made once per process and ``dim`` (a variable,
    placed as TensorFlow places it: on the first GPU when there is one, so that it lives with the
    step; under a distribution strategy, a mirrored one), the same numbers every time. ``scale`` != 1:
    that table times ``scale`` (another variable of the same size, for :func:`add_table_noise`; one
    scaled table is kept per ``dim``, the last one asked for)."""
    device = tf.config.list_logical_devices("GPU")
    where = device[0].name if device else "CPU"
    key = (int(dim), float(scale), where)
    if key not in _tables:
        if float(scale) != 1.0:  # keep one scaled table per dim and device: 16 MB each
            for old in [k for k in _tables if k[0] == int(dim) and k[2] == where and k[1] != 1.0]:
                del _tables[old]
        rows = max(1024, NOISE_TABLE_FLOATS // int(dim))
        with tf.init_scope():  # made eagerly even when first asked for inside a trace
            if float(scale) == 1.0:
                values = gaussian_noise([rows, int(dim)], tf.constant([20141127, int(dim)], tf.int64))
            else:
                values = noise_table(dim).read_value() * float(scale)
            _tables[key] = tf.Variable(values, trainable=False, name=f"noise_table_{dim}_x{float(scale):g}")
    return _tables[key]


def table_noise(shape: Any, seed: Any, stddev: float | tf.Tensor = 1.0, dtype: Any = tf.float32, *,
                dim: int) -> tf.Tensor:
    """``stddev`` x N(0, I) noise vectors of ``shape`` (``[..., batch, dim]``, ``dim`` static), a pure
    function of the int ``[2]`` ``seed``, read from :func:`noise_table` and randomly signed.

    When the ``n = prod(shape[:-1])`` vectors fit in the table (``n x dim <= 2^22 - 16``, e.g. a batch
    of up to about 2,000 at dim 2,048), they are ``n`` consecutive windows of ``dim`` numbers of the
    flattened table from one random offset (a multiple of 16, so that the slice shares the table's
    memory instead of copying it when ``n x dim`` is a multiple of 16 too), and each batch (each
    ``[batch, dim]`` slice) has one random sign: the vectors of a batch share no numbers, so flipping
    them together leaves them independent N(0, I). Larger draws (e.g. the larger batched
    cross-validation fits) take a random table row per vector, all rows cyclically shifted by one
    random offset, with a random sign per vector (rows can repeat there). ``stddev`` may be a tensor
    broadcasting against ``shape[:-1] + [1]`` (one std per model in the batched fits)."""
    shape = tf.convert_to_tensor(shape, tf.int32)
    seed = tf.cast(seed, tf.int64)
    table = noise_table(dim).read_value()
    lead = tf.concat([shape[:-2], tf.ones([tf.minimum(tf.size(shape), 2)], tf.int32)], 0)  # one per batch

    def windows():
        return _windows(table, shape, int(dim), seed) * _signs(lead, seed)

    def rows():
        return _signed_rows(table, shape, int(dim), seed)

    z = tf.cond(_fits(table, shape, int(dim)), windows, rows)
    return tf.cast(z * tf.cast(stddev, tf.float32), dtype)


def add_table_noise(inputs: tf.Tensor, seed: Any, stddev: float, dim: int) -> tf.Tensor:
    """``inputs + table_noise(tf.shape(inputs), seed, stddev, dim=dim)`` for ``inputs`` ``[batch, dim]``,
    in one elementwise pass (the noise layer's default draw): the windows come from the table
    pre-multiplied by ``stddev`` (:func:`noise_table` ``(dim, stddev)``, made once), so the draw is
    ``inputs + window`` or ``inputs - window`` with ``window`` a slice that shares the table's
    memory, where adding :func:`table_noise` takes a multiply and an add. Same numbers as
    :func:`table_noise` up to float32 rounding of the pre-multiplied table."""
    if inputs.shape.rank != 2:  # one sign per [batch, dim] slice: the general path
        return inputs + table_noise(tf.shape(inputs), seed, stddev, inputs.dtype, dim=dim)
    seed = tf.cast(seed, tf.int64)
    shape = tf.shape(inputs)
    table = noise_table(dim, float(stddev)).read_value()
    positive = tf.reshape(_signs([1, 1], seed), []) > 0  # table_noise's sign for a [batch, dim] draw

    def windows():
        z = tf.cast(_windows(table, shape, int(dim), seed), inputs.dtype)
        return tf.cond(positive, lambda: inputs + z, lambda: inputs - z)

    def rows():
        return inputs + tf.cast(_signed_rows(table, shape, int(dim), seed), inputs.dtype)

    return tf.cond(_fits(table, shape, int(dim)), windows, rows)


# The table draws. Seeds: the window offset (and the rows' shift) from fold 0, the rows from fold 1,
# the signs from fold 2 of the call's seed. Tables are tensors from read_value, never tf.gather on
# the variable: a ResourceGather switches the variable to copy-on-read, and every later read would
# copy all 16 MB.

def _fold(seed: tf.Tensor, i: int) -> tf.Tensor:
    return tf.random.experimental.stateless_fold_in(seed, i)


def _fits(table: tf.Tensor, shape: tf.Tensor, dim: int) -> tf.Tensor:
    return tf.reduce_prod(shape[:-1]) * dim <= tf.size(table) - _ALIGN


def _windows(table: tf.Tensor, shape: tf.Tensor, dim: int, seed: tf.Tensor) -> tf.Tensor:
    """``prod(shape[:-1])`` consecutive windows of ``dim`` numbers from one random 16-aligned offset."""
    need = tf.reduce_prod(shape[:-1]) * dim
    offset = tf.random.stateless_uniform([], _fold(seed, 0), 0, (tf.size(table) - need) // _ALIGN + 1,
                                         dtype=tf.int32) * _ALIGN
    return tf.reshape(tf.slice(tf.reshape(table, [-1]), [offset], [need]), shape)


def _signed_rows(table: tf.Tensor, shape: tf.Tensor, dim: int, seed: tf.Tensor) -> tf.Tensor:
    """A random table row per vector, all cyclically shifted by one random offset, each with a random
    sign (rows can repeat, so one sign per batch would repeat them exactly)."""
    rows = tf.random.stateless_uniform([tf.reduce_prod(shape[:-1])], _fold(seed, 1), 0, tf.shape(table)[0],
                                       dtype=tf.int32)
    shift = tf.random.stateless_uniform([], _fold(seed, 0), 0, dim, dtype=tf.int32)
    rolled = tf.reshape(tf.roll(tf.gather(table, rows), shift, axis=1), shape)
    return rolled * _signs(tf.concat([shape[:-1], [1]], 0), seed)


def _signs(shape: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """Random +1 / -1 float32 numbers of ``shape``."""
    return tf.cast(tf.random.stateless_uniform(shape, _fold(seed, 2), 0, 2, dtype=tf.int32) * 2 - 1, tf.float32)


def sample_noise(sampler: str, shape: Any, seed: Any, stddev: float | tf.Tensor, dtype: Any, dim: int) -> tf.Tensor:
    """``stddev`` x N(0, I) noise of ``shape`` from the named sampler (:data:`SAMPLERS`)."""
    if sampler == "table":
        return table_noise(shape, seed, stddev, dtype, dim=dim)
    check_sampler(sampler)
    if isinstance(stddev, (int, float)):  # the std inside the transform, as before samplers were named
        return gaussian_noise(shape, seed, float(stddev), dtype)
    return tf.cast(gaussian_noise(shape, seed) * tf.cast(stddev, tf.float32), dtype)


def _fast_noise_call(layer: keras.layers.GaussianNoise, sampler: str, inputs, training=False):
    if training and layer.stddev > 0:
        dim = int(inputs.shape[-1])
        if sampler == "table":
            return add_table_noise(inputs, layer.seed_generator.next(), layer.stddev, dim)
        return inputs + sample_noise(sampler, tf.shape(inputs), layer.seed_generator.next(), layer.stddev,
                                     inputs.dtype, dim)
    return inputs


def use_fast_sampler(layer: keras.layers.GaussianNoise, sampler: str = "table") -> keras.layers.GaussianNoise:
    """Make this ``GaussianNoise`` layer draw its training noise with ``sampler`` (:data:`SAMPLERS`):
    :func:`table_noise` or :func:`gaussian_noise`.

    Each noise vector N(0, stddev^2 I), a new one each step, same seed stream (the layer's
    ``SeedGenerator``), identity at inference; only this instance changes, so it saves (and loads)
    as a plain ``keras.layers.GaussianNoise``.
    """
    check_sampler(sampler)
    layer.call = lambda inputs, training=False: _fast_noise_call(layer, sampler, inputs, training)
    return layer


@keras.saving.register_keras_serializable(package="dfl_tf")
class FeatureNoise(keras.layers.GaussianNoise):
    """Alias of ``keras.layers.GaussianNoise`` (same ``stddev``/``seed`` config, same behaviour).

    Heads now use the built-in directly; this name stays registered so ``head.keras`` files
    saved before (class ``dfl_tf>FeatureNoise``) still load.
    """

    def __init__(self, stddev: float = DEFAULT_NOISE, seed: int | None = None, **kwargs):
        super().__init__(float(stddev), seed=seed, **kwargs)


@keras.saving.register_keras_serializable(package="dfl_tf")
class ScaledFeatureNoise(keras.layers.Layer):
    """Gaussian noise with per-dimension std ``stddev * scale[d]`` (``scale`` = training-set std).

    Meant for the raw embedding, before standardisation. ``scale`` is a non-trainable weight,
    saved with the model. Kept custom: no Keras built-in scales the noise per feature (a head
    using ``scaled-noise`` therefore needs ``dfl_tf`` imported to load).
    """

    def __init__(self, dim: int, stddev: float = DEFAULT_NOISE, scale: Sequence[float] | None = None,
                 seed: int | None = None, sampler: str = "table", **kwargs):
        super().__init__(**kwargs)
        check_sampler(sampler)
        self.dim, self.stddev, self.seed, self.sampler = int(dim), float(stddev), seed, sampler
        self._init_scale = None if scale is None else np.asarray(scale, np.float32).reshape(self.dim)
        self.seed_generator = keras.random.SeedGenerator(seed)

    def build(self, input_shape):
        init = (keras.initializers.Constant(self._init_scale) if self._init_scale is not None
                else keras.initializers.Ones())
        self.scale = self.add_weight(name="scale", shape=(self.dim,), initializer=init, trainable=False)
        self.built = True

    def call(self, inputs, training=False):
        if training and self.stddev > 0:
            noise = sample_noise(self.sampler, tf.shape(inputs), self.seed_generator.next(), self.stddev,
                                 inputs.dtype, self.dim)
            return inputs + noise * keras.ops.cast(self.scale, inputs.dtype)
        return inputs

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "dim": self.dim, "stddev": self.stddev, "seed": self.seed,
                "sampler": self.sampler}


@keras.saving.register_keras_serializable(package="dfl_tf")
class FeatureDropout(keras.layers.Dropout):
    """Alias of ``keras.layers.Dropout`` (same ``rate``/``seed`` config, same behaviour).

    Heads now use the built-in directly; this name stays registered so ``head.keras`` files
    saved before (class ``dfl_tf>FeatureDropout``) still load.
    """

    def __init__(self, rate: float = 0.1, seed: int | None = None, **kwargs):
        if not 0.0 <= float(rate) < 1.0:
            raise DflError(f"feature-dropout rate must be in [0, 1), got {rate}")
        kwargs.pop("noise_shape", None)
        super().__init__(float(rate), seed=seed, **kwargs)


def resolve_augment(augment: Iterable[Any] | None, noise: float | None) -> list[dict[str, Any]]:
    """Validated augmentation list, with the ``noise`` shortcut applied.

    ``noise=None`` keeps the ``noise`` entry of ``augment`` if there is one, else adds
    ``{name: noise, std: 0.1}`` (the default); ``noise=S>0`` sets (or adds) that entry's std;
    ``noise=0`` removes it.
    """
    specs: list[dict[str, Any]] = []
    for entry in augment or []:
        if isinstance(entry, str):
            entry = {"name": entry}
        if not isinstance(entry, dict) or "name" not in entry:
            raise DflError(f"augment entries are mappings with a 'name' (one of {', '.join(AUGMENTATIONS)}), "
                           f"got {entry!r}")
        name = str(entry["name"]).replace("_", "-")
        if name not in AUGMENTATIONS:
            raise DflError(f"unknown augmentation '{entry['name']}' (known: {', '.join(AUGMENTATIONS)})")
        params = {k: v for k, v in entry.items() if k != "name"}
        unknown = set(params) - set(AUGMENTATIONS[name])
        if unknown:
            raise DflError(f"augmentation '{name}' has no parameter(s) {sorted(unknown)} "
                           f"(known: {', '.join(AUGMENTATIONS[name])})")
        if any(s["name"] == name for s in specs):
            raise DflError(f"augmentation '{name}' is listed twice")
        spec = {"name": name, **AUGMENTATIONS[name], **params}
        if "sampler" in spec:
            check_sampler(spec["sampler"], f"augmentation '{name}': sampler")
        for key, value in list(spec.items()):
            if key not in ("name", "sampler"):
                try:
                    spec[key] = float(value)
                except (TypeError, ValueError) as exc:
                    raise DflError(f"augmentation '{name}': {key} must be a number, got {value!r}") from exc
                if spec[key] < 0:
                    raise DflError(f"augmentation '{name}': {key} must be >= 0, got {value}")
        if name == "feature-dropout" and spec["rate"] >= 1:
            raise DflError(f"augmentation 'feature-dropout': rate must be < 1, got {spec['rate']}")
        specs.append(spec)
    has_noise = any(s["name"] == "noise" for s in specs)
    if noise is None:
        if not has_noise:
            specs.insert(0, {"name": "noise", **AUGMENTATIONS["noise"], "std": DEFAULT_NOISE})
    elif float(noise) <= 0:
        specs = [s for s in specs if s["name"] != "noise"]
    elif has_noise:
        for s in specs:
            if s["name"] == "noise":
                s["std"] = float(noise)
    else:
        specs.insert(0, {"name": "noise", **AUGMENTATIONS["noise"], "std": float(noise)})
    for s in specs:
        if s["name"] == "noise" and s["std"] > 1:  # keras.layers.GaussianNoise's range
            raise DflError(f"noise std must be in [0, 1] (on standardised features), got {s['std']}")
    return specs


def augment_layers(specs: Sequence[dict[str, Any]], dim: int, train_std: np.ndarray | None = None
                   ) -> tuple[list[keras.layers.Layer], list[keras.layers.Layer]]:
    """(layers before standardisation, layers after it) for the model-side augmentations."""
    pre, post = [], []
    for spec in specs:
        if spec["name"] == "scaled-noise":
            pre.append(ScaledFeatureNoise(dim, spec["std"], scale=train_std, name="scaled_noise",
                                          sampler=spec.get("sampler", "table")))
        elif spec["name"] == "noise":
            post.append(use_fast_sampler(keras.layers.GaussianNoise(spec["std"], name="noise"),
                                         spec.get("sampler", "table")))
        elif spec["name"] == "feature-dropout":
            post.append(keras.layers.Dropout(spec["rate"], name="feature_dropout"))
    return pre, post


def mixup_alpha(specs: Sequence[dict[str, Any]]) -> float:
    return next((float(s["alpha"]) for s in specs if s["name"] == "mixup"), 0.0)


def mixup_batch(x: tf.Tensor, y: tf.Tensor, w: tf.Tensor, seed: tf.Tensor, alpha: float):
    """Mix a batch with a random permutation of itself: lambda ~ Beta(alpha, alpha) per sample.

    ``y`` are one-hot (or soft) labels, ``w`` sample weights, ``seed`` an int64 [2] stateless seed.
    """
    seed = tf.cast(seed, tf.int64)
    n = tf.shape(x)[0]
    s1, s2, s3 = (tf.random.experimental.stateless_fold_in(seed, i) for i in range(3))
    g1 = tf.random.stateless_gamma([n], s1, alpha=alpha)
    g2 = tf.random.stateless_gamma([n], s2, alpha=alpha)
    lam = g1 / tf.maximum(g1 + g2, 1e-12)
    perm = tf.argsort(tf.random.stateless_uniform([n], s3))
    lam_x = lam[:, None]
    x = lam_x * x + (1.0 - lam_x) * tf.gather(x, perm)
    y = lam_x * y + (1.0 - lam_x) * tf.gather(y, perm)
    w = lam * w + (1.0 - lam) * tf.gather(w, perm)
    return x, y, w
