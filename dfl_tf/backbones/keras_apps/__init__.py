"""The Keras Applications family (ImageNet weights from the Keras download): :mod:`.presets`."""
from dfl_tf.backbones.keras_apps import presets  # noqa: F401  (registers the entries)
