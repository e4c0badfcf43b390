"""The EfficientNet-Lite0 family: architecture (:mod:`.model`), entry and converter (:mod:`.presets`)."""
from dfl_tf.backbones.efficientnet_lite import presets  # noqa: F401  (registers the entry)
from dfl_tf.backbones.efficientnet_lite.presets import package_weights_file  # noqa: F401
