"""Multi-device extraction: run the frozen backbone under ``tf.distribute.MirroredStrategy``.

Which devices are used is decided by :func:`resolve_strategy` from the ``devices`` option of
:func:`dfl_tf.extraction.local.extract`, else the ``DFL_TF_DEVICES`` environment variable:

* unset, ``""`` or ``"auto"``: all visible GPUs when there are more than one, else one device;
* ``"none"``, ``"single"``, ``"1"``, ``"0"``: one device (TensorFlow's default placement);
* ``"all"``: all visible GPUs (all logical CPUs when there is no GPU);
* a comma list or sequence of device names, e.g. ``"/gpu:0,/gpu:1"`` or ``["/cpu:0", "/cpu:1"]``.

Each batch is split into contiguous slices, one per replica (replica ``i`` takes rows
``[i*ceil(n/k), (i+1)*ceil(n/k))``), and the per-replica outputs are concatenated in replica
order, so embeddings come back in sample order and equal the single-device ones within float
rounding. Head training (:func:`dfl_tf.train_head`) uses the same strategy through Keras
(global batch split across replicas, gradients all-reduced); fine-tuning stays single-device.
"""
from __future__ import annotations

import contextlib
import os
from typing import Callable, Sequence

import tensorflow as tf

from dfl_tf.errors import DflError

ENV = "DFL_TF_DEVICES"
_SINGLE = ("none", "single", "1", "0", "off")


def resolve_devices(devices: str | Sequence[str] | None = None) -> list[str] | None:
    """The device list to mirror over, or None for single-device execution."""
    if devices is None:
        devices = os.environ.get(ENV, "auto")
    if isinstance(devices, str):
        value = devices.strip()
        low = value.lower()
        if low in ("", "auto"):
            gpus = tf.config.list_logical_devices("GPU")
            return [d.name for d in gpus] if len(gpus) > 1 else None
        if low in _SINGLE:
            return None
        if low == "all":
            found = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
            names = [d.name for d in found]
        else:
            names = [d.strip() for d in value.split(",") if d.strip()]
    else:
        names = [str(d) for d in devices]
    if len(names) < 2:
        return None
    return names


def resolve_strategy(devices: str | Sequence[str] | None = None) -> tf.distribute.Strategy | None:
    """A MirroredStrategy over :func:`resolve_devices`' list, or None (single device)."""
    names = resolve_devices(devices)
    if names is None:
        return None
    try:
        return tf.distribute.MirroredStrategy(devices=names)
    except (ValueError, RuntimeError) as exc:
        raise DflError(f"cannot mirror over devices {names}: {exc} (set {ENV}=none for one device)") from exc


def scope(strategy: tf.distribute.Strategy | None):
    """``strategy.scope()``, or a no-op context for single-device runs."""
    return strategy.scope() if strategy is not None else contextlib.nullcontext()


def distributed_infer(strategy: tf.distribute.Strategy, model: Callable, size: int) -> Callable:
    """A tf.function ``x [N, size, size, 3] -> model(x)`` with the batch split across replicas.

    Rows stay in order: replica ``i`` embeds the ``i``-th contiguous slice (possibly empty
    for the last replicas of a short batch) and the slices are concatenated in replica order.
    """
    k = strategy.num_replicas_in_sync

    def step(x):
        i = tf.distribute.get_replica_context().replica_id_in_sync_group
        n = tf.shape(x)[0]
        per = (n + k - 1) // k
        start = tf.minimum(tf.cast(i, tf.int32) * per, n)
        stop = tf.minimum(start + per, n)
        return model(x[start:stop], training=False)

    @tf.function(reduce_retracing=True, input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32)])
    def infer(x):
        out = strategy.run(step, args=(x,))
        return tf.concat(strategy.experimental_local_results(out), axis=0)

    return infer
