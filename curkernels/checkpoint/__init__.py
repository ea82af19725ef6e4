"""Save and load compressed models (safetensors + config.json), load any model reference
(`load_model`), and transformers loading."""

from .errors import CheckpointError
from .load import load_compressed, read_compression_config
from .model_reference import load_model
from .module_specs import FORMAT_VERSION
from .save import save_compressed
from .transformers_integration import register_with_transformers

register_with_transformers()

__all__ = ["FORMAT_VERSION", "CheckpointError", "load_compressed", "load_model",
           "read_compression_config", "save_compressed"]
