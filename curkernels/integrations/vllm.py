"""The vLLM plugin: quantization method `curkernels`, which loads curkernels checkpoints.

`pip install curkernels[vllm]` installs the entry point `vllm.general_plugins: curkernels =
curkernels.integrations.vllm:register`; vLLM calls `register` in every process it starts, and a
checkpoint's `quantization_config.quant_method == "curkernels"` then selects
`CurkernelsQuantConfig` with no flag: `vllm serve OUT`, `LLM(model=OUT)`. The per-module specs
come from config.json's `compression_config` block; layers it does not name stay dense.
"""

import json
from pathlib import Path

import torch
from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig

from ..checkpoint.module_specs import (
    FORMAT_NAME,
    FORMAT_VERSION,
    CheckpointError,
    check_compression_config,
)
from .vllm_linear import CurkernelsLinearMethod
from .vllm_narrow import NarrowLinearMethod, check_narrow_pairs

# The linear method that computes with each module kind; "LowRankLinear" is the two-factor kind
# of checkpoints written before CURLinear took that form over.
METHODS = {"CURLinear": CurkernelsLinearMethod, "LowRankLinear": CurkernelsLinearMethod,
           "NarrowLinear": NarrowLinearMethod}


# Llama-style config flags that give layers biases: (block part, the modules of each vLLM layer
# the flag governs, merged ones together).
BIAS_FLAGS = {"attention_bias": ("self_attn", (("q_proj", "k_proj", "v_proj"), ("o_proj",))),
              "mlp_bias": ("mlp", (("gate_proj", "up_proj"), ("down_proj",)))}


def enable_bias_flags(hf_config, modules: dict[str, dict]) -> None:
    """Turn on a config's bias flag where every vLLM layer it governs holds a factored module
    with a bias (ROM's factors carry the output mean as one), so vLLM builds those layers with
    biases; the other modules of such a layer get zero biases (`vllm_loading`). A layer with
    no bias in the checkpoint could not load one, so the flag stays off and the biases of
    layers vLLM builds without one are refused when the layer is built."""
    layers = getattr(hf_config, "num_hidden_layers", 0)
    for flag, (block, groups) in BIAS_FLAGS.items():
        if getattr(hf_config, flag, True):  # no such flag, or already on
            continue
        merged = [[f"model.layers.{i}.{block}.{leaf}" for leaf in group]
                  for i in range(layers) for group in groups]
        if merged and all(any(modules.get(name, {}).get("bias") for name in names)
                          for names in merged):
            setattr(hf_config, flag, True)


class CurkernelsQuantConfig(QuantizationConfig):
    """Routes each vLLM linear layer to the checkpoint modules it is made of."""

    def __init__(self, format_version: int = FORMAT_VERSION):
        super().__init__()
        if format_version != FORMAT_VERSION:
            raise CheckpointError(f"unknown quantization_config.format_version "
                                  f"{format_version!r}: this curkernels reads {FORMAT_VERSION}")
        self.modules: dict[str, dict] | None = None
        self.name_mapper = None

    def get_name(self) -> str:
        return FORMAT_NAME

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.float32, torch.float16, torch.bfloat16]

    @classmethod
    def get_min_capability(cls) -> int:
        return 0  # torch ops run anywhere; curkernels' dispatch picks kernels the device has

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # everything is in config.json, which vLLM reads anyway

    @classmethod
    def from_config(cls, config: dict) -> "CurkernelsQuantConfig":
        return cls(config.get("format_version", FORMAT_VERSION))

    def maybe_update_config(self, model_name: str, hf_config=None, revision=None) -> None:
        block = getattr(hf_config, "compression_config", None)
        if block is None:
            config_file = Path(model_name) / "config.json"
            if config_file.is_file():
                block = json.loads(config_file.read_text()).get("compression_config")
        self.modules = check_compression_config(block)["modules"]
        check_narrow_pairs(self.modules)
        if hf_config is not None:
            enable_bias_flags(hf_config, self.modules)

    def apply_vllm_mapper(self, hf_to_vllm_mapper) -> None:
        self.name_mapper = hf_to_vllm_mapper

    def module_specs(self) -> dict[str, dict]:
        """The checkpoint's module specs under vLLM's module names."""
        if self.modules is None:
            raise CheckpointError("the curkernels quantization config was never given the "
                                  "checkpoint's compression_config (maybe_update_config)")
        if self.name_mapper is None:
            return self.modules
        return self.name_mapper.apply_dict(self.modules)

    def shard_names(self, prefix: str) -> list[str]:
        """The checkpoint modules a vLLM layer holds: qkv_proj → q/k/v_proj, and so on.

        Leading components no checkpoint name starts with are wrappers vLLM adds (a draft
        model's layers are `draft_model.model.layers...`) and are dropped."""
        roots = {name.split(".", 1)[0] for name in self.module_specs()}
        while "." in prefix and prefix.split(".", 1)[0] not in roots:
            prefix = prefix.split(".", 1)[1]
        parent, _, leaf = prefix.rpartition(".")
        packed = self.packed_modules_mapping.get(leaf)
        if not packed:
            return [prefix]
        return [f"{parent}.{name}" if parent else name for name in packed]

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        specs = self.module_specs()
        if not isinstance(layer, LinearBase):
            if prefix in specs:
                raise CheckpointError(f"compression_config factors {prefix!r}, which vLLM "
                                      f"builds as a {type(layer).__name__}: the curkernels "
                                      f"plugin serves factored linear layers only")
            return None
        names = self.shard_names(prefix)
        layer_specs = [specs.get(name) for name in names]
        if all(spec is None for spec in layer_specs):
            return UnquantizedLinearMethod()
        for name, spec in zip(names, layer_specs, strict=True):
            if spec is not None and spec["type"] not in METHODS:
                raise CheckpointError(f"compression_config.modules[{name!r}] is a "
                                      f"{spec['type']}; the vLLM plugin serves "
                                      f"{', '.join(METHODS)} modules and dense layers")
        kinds = {METHODS[spec["type"]] for spec in layer_specs if spec is not None}
        method = NarrowLinearMethod if NarrowLinearMethod in kinds else CurkernelsLinearMethod
        return method(names, layer_specs)


def register() -> None:
    """The `vllm.general_plugins` entry point; idempotent (vLLM calls it in every process)."""
    register_quantization_config(FORMAT_NAME)(CurkernelsQuantConfig)
