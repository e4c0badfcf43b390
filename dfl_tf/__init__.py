"""dfl_tf: deep feature learning for histopathology on TensorFlow/Keras.

One frozen backbone embeds image patches once; small heads train on the stored embeddings;
backbone and heads ship together as one SavedModel.
"""
from __future__ import annotations

__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy public API: importing dfl_tf stays cheap (no TensorFlow) until a function is used.
    import importlib

    api = {
        "extract": "dfl_tf.extraction.local",
        "load_backbone": "dfl_tf.backbones.registry",
        "import_weights": "dfl_tf.backbones.converter",
        "load_embeddings": "dfl_tf.store.shards",
        "fuse_stores": "dfl_tf.store.fuse",
        "train_head": "dfl_tf.heads.train",
        "evaluate": "dfl_tf.heads.evaluate",
        "export_model": "dfl_tf.serve.export",
        "load_model": "dfl_tf.serve.export",
        "predict": "dfl_tf.serve.predict",
        "heatmap": "dfl_tf.serve.heatmap",
        "tile": "dfl_tf.data.tissue",
        "demo": "dfl_tf.demo",
        "select_backbones": "dfl_tf.select.protocol",
        "finetune": "dfl_tf.baselines.finetune",
        "ExtractOptions": "dfl_tf.options",
        "TrainOptions": "dfl_tf.options",
        "SelectOptions": "dfl_tf.options",
    }
    if name in api:
        return getattr(importlib.import_module(api[name]), name)
    raise AttributeError(f"module 'dfl_tf' has no attribute {name!r}")


__all__ = ["extract", "load_backbone", "import_weights", "load_embeddings", "fuse_stores", "train_head", "evaluate", "export_model", "load_model",
           "predict", "heatmap", "tile", "__version__", "select_backbones", "finetune",
           "ExtractOptions", "TrainOptions", "SelectOptions"]
