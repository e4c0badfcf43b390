"""One options dataclass per command: defaults, help texts and validation in one place.

The CLI builds each command's flags from its dataclass (``dfl_tf.cli.option_flags``), the public
function takes the fields as keywords or ``options=`` (:func:`dfl_tf.options.base.takes_options`),
and YAML configs are checked against the field types (:func:`dfl_tf.config.merge`). No TensorFlow
is imported here.
"""
from dfl_tf.options.base import cli_fields, field_names, option  # noqa: F401
from dfl_tf.options.extract import (FIELDS, FINETUNE_FIELDS, PRECISIONS, SELECT_FIELDS, STORAGE_DTYPES,  # noqa: F401
                                    ExtractOptions, takes_options)
from dfl_tf.options.finetune import FinetuneOptions  # noqa: F401
from dfl_tf.options.select import SelectOptions  # noqa: F401
from dfl_tf.options.train import TrainOptions  # noqa: F401
