"""Forgetting `import curkernels` must not give a model with random factored layers: plain
transformers refuses a checkpoint with an error saying what to do, and the folder's README.md
says how to load it."""

import json
import subprocess
import sys

import pytest
from model_configs import model_outputs, sample_inputs, tiny_model
from transformers import AutoModelForCausalLM
from transformers.quantizers import HfQuantizer

import curkernels as ck
from curkernels.checkpoint.transformers_integration import CurkernelsHfQuantizer

PLAIN_LOAD = """
import json, sys
from transformers import AutoConfig, AutoModelForCausalLM
config = AutoConfig.from_pretrained(sys.argv[1])
result = {"quant_method": config.quantization_config["quant_method"]}
try:
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
    result["loaded"] = type(model.model.layers[0].self_attn.q_proj).__name__
except Exception as exc:
    result["error"] = f"{type(exc).__name__}: {exc}"
result["curkernels_imported"] = "curkernels" in sys.modules
print(json.dumps(result))
"""


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model = tiny_model("llama")
    ck.compress(model, method="svd", keep=0.5)
    folder = tmp_path_factory.mktemp("plain") / "ckpt"
    ck.save_compressed(model, folder)
    return folder, model


def test_plain_transformers_refuses_the_checkpoint_saying_what_to_do(checkpoint):
    folder, _ = checkpoint
    run = subprocess.run([sys.executable, "-c", PLAIN_LOAD, str(folder)], capture_output=True,
                         text=True, timeout=300, check=True)
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["curkernels_imported"] is False
    assert result["quant_method"] == "curkernels"  # what vLLM reads stays as it was
    assert "loaded" not in result, result
    assert result["error"].startswith("ValueError")
    assert "`import curkernels` before from_pretrained" in result["error"]
    assert "curkernels.load_compressed(folder)" in result["error"]


def test_every_checkpoint_folder_says_how_to_load_it(checkpoint):
    folder, _ = checkpoint
    readme = (folder / "README.md").read_text()
    assert "import curkernels" in readme and "ck.load_compressed(" in readme


def test_load_compressed_loads_where_no_hook_drops_the_guard(checkpoint, monkeypatch):
    """transformers 4.x reads the weights-file entry before any quantizer hook runs: there
    only `load_compressed` can load the checkpoint, and it must."""
    folder, model = checkpoint
    monkeypatch.setattr(CurkernelsHfQuantizer, "update_attn_implementation",
                        HfQuantizer.update_attn_implementation)
    with pytest.raises(ValueError, match="curkernels.load_compressed"):
        AutoModelForCausalLM.from_pretrained(folder)
    reloaded = ck.load_compressed(folder)
    assert model_outputs(reloaded, sample_inputs()).equal(model_outputs(model, sample_inputs()))
