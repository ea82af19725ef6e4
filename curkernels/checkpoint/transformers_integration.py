"""Let `AutoModel*.from_pretrained(folder)` load curkernels checkpoints.

config.json carries `quantization_config = {"quant_method": "curkernels", ...}`; transformers
then builds the model on the meta device and hands it to `CurkernelsHfQuantizer`, which swaps
in the factored modules the `compression_config` block describes and checks the checkpoint's
files and tensors against them, before any weight is read. Registered through transformers' public quantizer-registration API when curkernels is imported.
"""

from pathlib import Path

from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from .checkpoint_files import check_files_inside, weight_files
from .errors import CheckpointError
from .module_specs import FORMAT_NAME, FORMAT_VERSION, check_compression_config
from .plain_guard import drop_guard
from .surgery import apply_compression_config, finish_loading
from .tensor_checks import check_checkpoint_tensors


class CurkernelsConfig(QuantizationConfigMixin):
    """The `quantization_config` entry that routes loading to curkernels."""

    def __init__(self, format_version: int = FORMAT_VERSION, **kwargs):
        self.quant_method = FORMAT_NAME
        self.format_version = format_version

    def to_dict(self) -> dict:
        return {"quant_method": FORMAT_NAME, "format_version": self.format_version}


def local_folder(model) -> Path | None:
    """The folder `from_pretrained` loads from, where the config names one (not a hub name)."""
    folder = Path(str(getattr(model.config, "name_or_path", "") or ""))
    return folder if folder.is_dir() else None


def files_being_loaded(model, hook_kwargs: dict) -> list[str] | None:
    """The safetensors files `from_pretrained` is loading. transformers 5 hands them to the
    quantizer; 4.x does not, but names the folder in the config: a local folder's files are
    found there. None where neither says."""
    files = hook_kwargs.get("checkpoint_files")
    if files:
        return list(files)
    folder = local_folder(model)
    return None if folder is None else weight_files(folder)


def check_checkpoint(model, block: dict, hook_kwargs: dict) -> None:
    """The files being loaded stay inside a local checkpoint folder, and their tensors fit
    `model` (factored modules in place): checked before any weight is read."""
    files = files_being_loaded(model, hook_kwargs)
    folder = local_folder(model)
    if folder is not None:
        check_files_inside(folder, files)
    if files:
        check_checkpoint_tensors(model, block, files)


class CurkernelsHfQuantizer(HfQuantizer):
    requires_calibration = True  # factors come from a checkpoint; nothing is made on the fly

    def validate_environment(self, *args, **kwargs):
        if self.quantization_config.format_version != FORMAT_VERSION:
            raise CheckpointError(f"unknown curkernels format_version "
                                  f"{self.quantization_config.format_version!r}; this version "
                                  f"reads {FORMAT_VERSION}")

    def update_attn_implementation(self, config):
        # transformers 5 calls this hook, the only one that sees the config, before it looks for
        # the weight files: the place to drop the entry that stops plain transformers.
        drop_guard(config)
        return super().update_attn_implementation(config)

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        return False

    def _process_model_before_weight_loading(self, model, **kwargs):
        block = check_compression_config(getattr(model.config, "compression_config", None))
        apply_compression_config(model, block)
        check_checkpoint(model, block, kwargs)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        finish_loading(model, model.config.compression_config)
        return model

    def is_serializable(self, *args, **kwargs) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_compileable(self) -> bool:
        return True


def register_with_transformers() -> None:
    """Idempotent: importing curkernels twice (or reloading) must not fail."""
    from transformers.quantizers.auto import (
        AUTO_QUANTIZATION_CONFIG_MAPPING,
        AUTO_QUANTIZER_MAPPING,
    )
    if FORMAT_NAME not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(FORMAT_NAME)(CurkernelsConfig)
    if FORMAT_NAME not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(FORMAT_NAME)(CurkernelsHfQuantizer)
