"""Save and load compressed models (safetensors + config.json), and transformers loading."""

from .errors import CheckpointError
from .load import load_compressed, read_compression_config
from .module_specs import FORMAT_VERSION
from .save import save_compressed
from .transformers_integration import register_with_transformers

register_with_transformers()

__all__ = ["FORMAT_VERSION", "CheckpointError", "load_compressed", "read_compression_config",
           "save_compressed"]
