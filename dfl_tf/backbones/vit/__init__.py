"""The ViT family: one Keras architecture (:mod:`.model`), checkpoint key converters for timm,
hub and transformers layouts (:mod:`.checkpoint`) and the registry entries (:mod:`.presets`)."""
from dfl_tf.backbones.vit import presets  # noqa: F401  (registers the entries)
from dfl_tf.backbones.vit.model import ViTConfig, build_vit  # noqa: F401
