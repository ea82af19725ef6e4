"""Loading builds factored modules on the meta device: peak memory stays below the size of
the dense model, which is never materialised. Measured in a fresh process (peak RSS)."""

import json
import subprocess
import sys

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import curkernels as ck
from curkernels import CURLinear
from curkernels.nn import find_linears, swap_linears

CONFIG = dict(vocab_size=256, hidden_size=1024, intermediate_size=4096, num_hidden_layers=4,
              num_attention_heads=8, num_key_value_heads=8)
RANK = 32

MEASURE = """
import json, resource, sys, torch, transformers, curkernels as ck
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
model = ck.load_compressed(sys.argv[1])
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
params = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps({"peak_growth": (after - before) * 1024, "loaded_bytes": params}))
"""


def test_peak_memory_while_loading_stays_below_the_dense_model(tmp_path):
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**CONFIG))
    dense_bytes = sum(p.numel() * 4 for p in model.parameters())
    targets = find_linears(model, ["model.layers.*"])
    swap_linears(model, targets, lambda _, linear: CURLinear(
        torch.randn(linear.out_features, RANK) / 8, None,
        torch.randn(RANK, linear.in_features) / 8))
    model.to_empty(device="cpu")  # uninitialised storage: loading refuses NaN, so fill it all
    for param in model.parameters():
        torch.nn.init.normal_(param, std=0.02)
    model.model.rotary_emb.__init__(model.config)  # to_empty left its buffers uninitialised
    ck.save_compressed(model, tmp_path / "ckpt")
    del model
    result = subprocess.run([sys.executable, "-c", MEASURE, str(tmp_path / "ckpt")],
                            capture_output=True, text=True, timeout=300, check=True)
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    assert measured["loaded_bytes"] < dense_bytes / 4
    assert measured["peak_growth"] < dense_bytes / 2, (measured, dense_bytes)
