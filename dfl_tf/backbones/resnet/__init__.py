"""The ResNet-50 v1.5 family in torchvision's layout (:mod:`.model`) and its entries and converter
(:mod:`.presets`)."""
from dfl_tf.backbones.resnet import presets  # noqa: F401  (registers the entries)
