"""Loading validates every `compression_config` field and every tensor before the model is
built: each malformed spec or corrupt tensor is a CheckpointError naming the module or tensor
and what was expected, through `load_compressed` and through `from_pretrained` alike."""

import json
import os
import shutil
from types import SimpleNamespace

import pytest
import torch
from model_configs import DECODER_SHAPE, model_outputs, sample_inputs, tiny_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import curkernels as ck
from curkernels import CheckpointError, CURLinear
from curkernels.checkpoint.transformers_integration import files_being_loaded

CUR = "model.layers.0.self_attn.q_proj"  # CURLinear, full U, row and column picks (48×48)
GATHER = "model.layers.0.self_attn.k_proj"  # CURLinear reading R's rows from a base (24×48)
DIAG = "model.layers.0.self_attn.v_proj"  # CURLinear in SVD form: diagonal U, no indices
LOW_RANK = "model.layers.0.mlp.up_proj"  # CURLinear without U: two factors (80×48)
BASE_ROWS = 30


def mixed_model():
    """One module of each kind and form a checkpoint records, the rest dense."""
    model = tiny_model("llama")
    attention = model.model.layers[0].self_attn
    g = torch.Generator().manual_seed(3)
    w = attention.q_proj.weight.detach()
    rows, cols = torch.randperm(48, generator=g)[:6], torch.randperm(48, generator=g)[:8]
    C, R = w[:, cols], w[rows]
    U = (torch.linalg.pinv(C.double()) @ w.double() @ torch.linalg.pinv(R.double())).float()
    attention.q_proj = CURLinear(C, U, R, row_indices=rows, col_indices=cols)
    base = torch.randn(BASE_ROWS, 48, generator=g)
    attention.k_proj = CURLinear(torch.randn(24, 5, generator=g), torch.randn(5, 4, generator=g),
                                 base, row_indices=[0, 7, 29, 12], gather=True)
    attention.v_proj = CURLinear.from_linear(attention.v_proj, 6)
    model.model.layers[0].mlp.up_proj = CURLinear.from_linear(
        model.model.layers[0].mlp.up_proj, 10, link=False)
    return model


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    folder = tmp_path_factory.mktemp("original") / "ckpt"
    ck.save_compressed(mixed_model(), folder)
    return folder


@pytest.fixture
def saved(original, tmp_path):
    return shutil.copytree(original, tmp_path / "ckpt")


def rewrite_config(folder, edit):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))


def rewrite_weights(folder, edit):
    path = folder / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def assert_refused(folder, match):
    for load in (ck.load_compressed, AutoModelForCausalLM.from_pretrained):
        with pytest.raises(CheckpointError, match=match):
            load(folder)


def test_the_mixed_checkpoint_loads_and_matches(saved):
    model = mixed_model()
    reloaded = ck.load_compressed(saved)
    assert torch.equal(model_outputs(reloaded, sample_inputs()),
                       model_outputs(model, sample_inputs()))
    k = reloaded.model.layers[0].self_attn.k_proj
    assert k.gather and k.row_indices.tolist() == [0, 7, 29, 12]


def spec_edit(module, **changes):
    def edit(config):
        spec = config["compression_config"]["modules"][module]
        for field, value in changes.items():
            if value is _DELETE:
                del spec[field]
            else:
                spec[field] = value
    return edit


_DELETE = object()
Q = rf"modules\['{CUR}'\]"
K = rf"modules\['{GATHER}'\]"
UP = rf"modules\['{LOW_RANK}'\]"
V = rf"modules\['{DIAG}'\]"


@pytest.mark.parametrize("edit, match", [
    # the deep torch errors: a negative, a string and a missing field
    (spec_edit(LOW_RANK, rank=-5), rf"{UP}\.rank must be a positive int, got -5"),
    (spec_edit(LOW_RANK, rank="21"), rf"{UP}\.rank must be a positive int, got '21'"),
    (spec_edit(LOW_RANK, in_features=_DELETE), rf"{UP} lacks \['in_features'\]"),
    (spec_edit(CUR, row_indices="0,1,2,3,4,5"), rf"{Q}\.row_indices must be a list of ints"),
    (spec_edit(LOW_RANK, rank=0), rf"{UP}\.rank must be a positive int, got 0"),
    (spec_edit(LOW_RANK, rank=10.0), rf"{UP}\.rank must be a positive int, got 10\.0"),
    (spec_edit(LOW_RANK, rank=True), rf"{UP}\.rank must be a positive int, got True"),
    (spec_edit(LOW_RANK, rank=10**9), rf"{UP}\.rank must be at most .* = 48, got 1000000000"),
    (spec_edit(LOW_RANK, rank=None), rf"{UP}\.rank must be a positive int, got None"),
    (spec_edit(LOW_RANK, out_features="80"), rf"{UP}\.out_features must be a positive int"),
    (spec_edit(LOW_RANK, out_features=81), rf"describes '{LOW_RANK}' as a 81×48 Linear"),
    (spec_edit(CUR, bias=True), rf"lacks tensor '{CUR}\.bias'"),  # a bias is the spec's own (ROM)
    (spec_edit(CUR, bias="no"), rf"{Q}\.bias must be true or false, got 'no'"),
    (spec_edit(CUR, type="FancyLinear"), rf"{Q}\.type must be one of .*, got 'FancyLinear'"),
    (spec_edit(CUR, type=_DELETE), rf"{Q}\.type must be one of .*, got None"),
    (spec_edit(CUR, u="triangular"), rf"{Q}\.u must be one of \['full', 'diag', 'none'\]"),
    (spec_edit(CUR, scale=2.0), rf"{Q} has fields a CURLinear spec does not have: \['scale'\]"),
    (spec_edit(CUR, inner=49), rf"{Q}\.inner must be at most in_features = 48"),
    (spec_edit(DIAG, inner=7), rf"{V}\.inner must equal the rank 6 with u = 'diag'"),
    (spec_edit(CUR, row_indices=[1, 2, 3, 4, 5, 48]),
     rf"{Q}\.row_indices\[5\] = 48 is out of range: .*dense weight, \[0, 48\)"),
    (spec_edit(CUR, row_indices=[1, 2, 3, 4, 5, -1]), rf"{Q}\.row_indices\[5\] = -1 is out of"),
    (spec_edit(CUR, row_indices=[1, 2, 3, 4, 5, 5]), rf"{Q}\.row_indices must not repeat .*5"),
    (spec_edit(CUR, row_indices=[1, 2, 3, 4, 5]), rf"{Q}\.row_indices must hold 6 indices, got 5"),
    (spec_edit(CUR, row_indices=[1, 2, 3, 4, 5, "6"]), rf"{Q}\.row_indices\[5\] must be an int"),
    (spec_edit(CUR, row_indices=[1, 2, 3, 4, 5, 6.0]), rf"{Q}\.row_indices\[5\] must be an int"),
    (spec_edit(CUR, col_indices=[0, 1, 2, 3, 4, 5, 6, 99]), rf"{Q}\.col_indices\[7\] = 99"),
    (spec_edit(CUR, col_indices=[0, 1]), rf"{Q}\.col_indices must hold 8 indices, got 2"),
    # the gather form: rows past the base weight would be read out of bounds by the kernels
    (spec_edit(GATHER, row_indices=[0, 7, 29, BASE_ROWS]),
     rf"{K}\.row_indices\[3\] = 30 is out of range: .*base weight R, \[0, 30\)"),
    (spec_edit(GATHER, base_rows=None), rf"{K} has gather = true, which needs base_rows"),
    (spec_edit(CUR, base_rows=6), rf"{Q}\.base_rows must be null without gather"),
    (spec_edit(CUR, gather="yes"), rf"{Q}\.gather must be true or false"),
])
def test_malformed_spec_is_refused_naming_the_field(saved, edit, match):
    rewrite_config(saved, edit)
    assert_refused(saved, match)


@pytest.mark.parametrize("edit, match", [
    (lambda c: c["compression_config"].update(format_version="1"), "format_version '1'"),
    (lambda c: c["compression_config"].update(format_version=True), "format_version True"),
    (lambda c: c["compression_config"].update(format="gguf"), "format must be 'curkernels'"),
    (lambda c: c["compression_config"].update(method=5), "method must be a string or null"),
    (lambda c: c["compression_config"].update(modules={}), "modules must map module names"),
    (lambda c: c["compression_config"]["modules"].update({CUR: [48, 48]}),
     rf"{Q} must be a JSON object"),
    (lambda c: c.update(compression_config=[1]), "no 'compression_config' block"),
])
def test_malformed_block_is_refused(saved, edit, match):
    rewrite_config(saved, edit)
    with pytest.raises(CheckpointError, match=match):
        ck.load_compressed(saved)


def _set(key, value):
    return lambda tensors: tensors.__setitem__(key, value)


def _poison(key, value):
    def edit(tensors):
        tensors[key] = tensors[key].clone()
        tensors[key].view(-1)[3] = value
    return edit


@pytest.mark.parametrize("edit, match", [
    (lambda t: t.pop("model.embed_tokens.weight"),
     r"lacks tensor\(s\) the model needs: 'model.embed_tokens.weight'.*shape \(96, 48\).*random"),
    (lambda t: t.pop("lm_head.weight"), r"needs: 'lm_head.weight'"),  # not tied in this model
    (lambda t: t.pop("model.layers.1.post_attention_layernorm.weight"),
     "needs: 'model.layers.1.post_attention_layernorm.weight'"),
    (lambda t: t.pop(f"{CUR}.U"), rf"lacks tensor '{CUR}.U' \(expected shape \(8, 6\)\)"),
    (_poison(f"{CUR}.C", float("nan")), rf"'{CUR}.C' holds NaN or Inf"),
    (_poison(f"{LOW_RANK}.R", float("inf")), rf"'{LOW_RANK}.R' holds NaN or Inf"),
    (_poison("model.norm.weight", float("nan")), "'model.norm.weight' holds NaN or Inf"),
    (_set(f"{CUR}.U", torch.ones(8, 6, dtype=torch.int32)),
     rf"'{CUR}.U' has dtype I32, expected a float type"),
    (_set(f"{CUR}.U", torch.ones(8, 6, dtype=torch.float16)),
     rf"the factors of '{CUR}' must share one dtype"),
    (_set("model.norm.weight", torch.ones(48, dtype=torch.int64)),
     "'model.norm.weight' has dtype I64, expected a float type"),
    (_set("model.embed_tokens.weight", torch.zeros(96, 47)),
     r"'model.embed_tokens.weight' has shape \(96, 47\), expected \(96, 48\)"),
    (_set(f"{GATHER}.R", torch.zeros(BASE_ROWS - 1, 48)),
     rf"'{GATHER}.R' has shape \(29, 48\), expected \(30, 48\)"),
    (_set("model.layers.0.self_attn.q_proj.weight", torch.zeros(48, 48)),
     "does not have: 'model.layers.0.self_attn.q_proj.weight'"),
])
def test_corrupt_tensor_is_refused_naming_it(saved, edit, match):
    rewrite_weights(saved, edit)
    assert_refused(saved, match)


def test_tied_head_may_be_absent_but_nothing_else(tmp_path):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**DECODER_SHAPE, tie_word_embeddings=True)).eval()
    ck.compress(model, method="svd", keep=0.5)
    ck.save_compressed(model, tmp_path / "tied")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "tied")
    assert torch.equal(model_outputs(reloaded, sample_inputs()),
                       model_outputs(model, sample_inputs()))
    rewrite_weights(tmp_path / "tied", lambda t: t.pop("model.embed_tokens.weight"))
    assert_refused(tmp_path / "tied", "needs: 'lm_head.weight', 'model.embed_tokens.weight'")


def test_weights_linked_from_outside_the_folder_are_refused(saved, tmp_path):
    outside = tmp_path / "elsewhere.safetensors"
    shutil.move(saved / "model.safetensors", outside)
    os.symlink(outside, saved / "model.safetensors")
    assert_refused(saved, r"model.safetensors resolves to .*elsewhere.safetensors, outside the "
                          r"checkpoint folder")


def test_config_linked_from_outside_the_folder_is_refused(saved, tmp_path):
    shutil.move(saved / "config.json", tmp_path / "config.json")
    os.symlink(tmp_path / "config.json", saved / "config.json")
    assert_refused(saved, "config.json resolves to .* outside the checkpoint folder")


def test_a_link_inside_the_folder_is_fine(saved):
    (saved / "weights").mkdir()
    shutil.move(saved / "model.safetensors", saved / "weights" / "data.safetensors")
    os.symlink(saved / "weights" / "data.safetensors", saved / "model.safetensors")
    assert ck.load_compressed(saved).model.layers[0].mlp.up_proj.u_kind == "none"


def test_shards_named_outside_the_folder_are_refused(tmp_path):
    ck.save_compressed(mixed_model(), tmp_path / "sharded", max_shard_size="20KB")
    index_path = tmp_path / "sharded" / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = index["weight_map"]["model.norm.weight"]
    shutil.move(tmp_path / "sharded" / shard, tmp_path / shard)
    index["weight_map"] = {k: (f"../{shard}" if v == shard else v)
                           for k, v in index["weight_map"].items()}
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"{shard} resolves to .* outside the checkpoint"):
        ck.load_compressed(tmp_path / "sharded")
    with pytest.raises(ValueError, match="outside"):  # transformers 5 checks shard names too
        AutoModelForCausalLM.from_pretrained(tmp_path / "sharded")


def test_a_tensor_stored_in_two_shards_is_refused(tmp_path):
    ck.save_compressed(mixed_model(), tmp_path / "sharded", max_shard_size="20KB")
    index_path = tmp_path / "sharded" / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = index["weight_map"]["model.norm.weight"]
    other = next(v for v in index["weight_map"].values() if v != shard)
    tensors = load_file(tmp_path / "sharded" / other)
    tensors["model.norm.weight"] = torch.ones(48)
    save_file(tensors, tmp_path / "sharded" / other, metadata={"format": "pt"})
    assert_refused(tmp_path / "sharded", "'model.norm.weight' is stored twice")


def test_a_broken_shard_index_is_refused(saved):
    (saved / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    with pytest.raises(CheckpointError, match="not a safetensors index .*'weight_map'"):
        ck.load_compressed(saved)
    model = SimpleNamespace(config=SimpleNamespace(name_or_path=str(saved)))
    with pytest.raises(CheckpointError, match="not a safetensors index"):
        files_being_loaded(model, {})  # how transformers 4.x finds the files


@pytest.mark.parametrize("rows, cols, match", [
    ([1, 2, 48], None, r"rows must index the base weight's 48 rows, got values in \[1, 48\]"),
    (None, [0, 53], r"rows must index the base weight's 53 rows"),
])
def test_cur_linear_refuses_picks_outside_the_dense_weight(rows, cols, match):
    """Without gather, row picks index W's m rows and column picks its n columns."""
    C = torch.randn(48, 2 if cols else 3)
    U = torch.randn(C.shape[1], 3)
    with pytest.raises(IndexError, match=match):
        CURLinear(C, U, torch.randn(3, 53), row_indices=rows, col_indices=cols)
