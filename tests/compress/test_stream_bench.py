"""bench/stream_compress.py writes checkpoints of exactly the Llama shapes it names."""

import pytest
import torch
from bench_scripts import load_bench_script
from transformers import LlamaConfig, LlamaForCausalLM

bench = load_bench_script("stream_compress")


@pytest.mark.parametrize("shape", sorted(bench.SHAPES))
def test_tensor_shapes_are_the_models_own(shape):
    config = LlamaConfig(**bench.SHAPES[shape])
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    stored = {name: tuple(t.shape) for name, t in model.state_dict().items()
              if not (config.tie_word_embeddings and name == "lm_head.weight")}
    assert bench.tensor_shapes(config) == stored


def test_written_checkpoint_loads_whole(tmp_path):
    folder = bench.write_checkpoint(tmp_path / "dense", "small")
    model, info = LlamaForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.dtype == torch.bfloat16 and (folder / "tokenizer.json").is_file()
    assert len(list(folder.glob("*.safetensors"))) == 2 + model.config.num_hidden_layers


def test_a_few_blocks_of_a_shape(tmp_path):
    folder = bench.write_checkpoint(tmp_path / "dense", "small", blocks=1)
    model = LlamaForCausalLM.from_pretrained(folder)
    assert model.config.num_hidden_layers == 1
    assert model.config.hidden_size == bench.SHAPES["small"]["hidden_size"]
