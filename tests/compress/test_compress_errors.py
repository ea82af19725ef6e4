"""Bad input gets a clear error naming the argument."""

import pytest
import torch

import curkernels as ck


@pytest.mark.parametrize("keep", [0, -0.5, 1.5, float("nan"), "half", True])
def test_keep_out_of_range(keep, tiny_bert):
    with pytest.raises(ValueError, match="keep"):
        ck.compress(tiny_bert, "svd", keep)


@pytest.mark.parametrize("method", ["asvd", "svdllm", "curing", "rom", "lpaf"])
def test_missing_calibration(method, tiny_bert):
    with pytest.raises(ValueError, match="calib"):
        ck.compress(tiny_bert, method, 0.5)


def test_unknown_method(tiny_bert):
    with pytest.raises(ValueError, match="method"):
        ck.compress(tiny_bert, "qr", 0.5)


def test_targets_matching_nothing(tiny_bert):
    with pytest.raises(ValueError, match="targets"):
        ck.compress(tiny_bert, "svd", 0.5, targets=["no_such_proj"])


def test_layers_out_of_range(tiny_bert):
    with pytest.raises(ValueError, match="layers"):
        ck.compress(tiny_bert, "svd", 0.5, layers=[7])


def test_layer_count_needs_calibration(tiny_bert):
    with pytest.raises(ValueError, match="calib"):
        ck.compress(tiny_bert, "svd", 0.5, layers=1)


def test_bad_rank_multiple(tiny_bert):
    with pytest.raises(ValueError, match="rank_multiple"):
        ck.compress(tiny_bert, "svd", 0.5, rank_multiple=0)


@pytest.mark.parametrize("method", ["asvd", "svdllm", "curing", "rom"])
def test_nan_statistics(method, tiny_bert, batches):
    with torch.no_grad():
        tiny_bert.embeddings.word_embeddings.weight[7] = float("inf")
    batches[0]["input_ids"][0, 1] = 7
    with pytest.raises(ValueError, match="NaN or Inf"):
        ck.compress(tiny_bert, method, 0.5, batches)


def test_nan_weight(tiny_bert):
    with torch.no_grad():
        tiny_bert.encoder.layer[0].attention.self.query.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        ck.compress(tiny_bert, "svd", 0.5)


def test_curing_bad_selection(tiny_bert, batches):
    with pytest.raises(ValueError, match="selection"):
        ck.compress(tiny_bert, "curing", 0.5, batches, selection="random")


def test_calibration_ids_outside_the_vocabulary(tiny_llama, batches):
    """Named with the vocabulary size, not an IndexError from the embedding lookup."""
    batches[1]["input_ids"][2, 3] = 96
    with pytest.raises(ValueError, match=r"calib\[1\] holds token id 96.*vocabulary of 96"):
        ck.compress(tiny_llama, "asvd", 0.5, batches)


def test_nan_weight_blamed_on_its_own_module(tiny_llama, batches):
    """Layer 1's gate_proj is not a target here; its NaN used to surface as layer 2's
    q_proj calibration statistics."""
    with torch.no_grad():
        tiny_llama.model.layers[1].mlp.gate_proj.weight[3, 4] = float("nan")
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.gate_proj\.weight"):
        ck.compress(tiny_llama, "curing", 0.5, batches, targets=["q_proj"], layers=[2, 3])


@pytest.mark.parametrize("method", ["svd", "curing"])
def test_rank_multiple_rounds_down_or_refuses(method, tiny_llama, batches):
    """rank_multiple=128 on 32-wide weights used to round a rank up to the full width: a
    module larger than dense. Rounding down leaves 0 here, so it is an error naming it."""
    with pytest.raises(ValueError, match="rank_multiple=128"):
        ck.compress(tiny_llama, method, 0.5, batches, rank_multiple=128)
    report = ck.compress(tiny_llama, method, 0.5, batches, rank_multiple=4)
    assert all(m.rank % 4 == 0 and m.params_after <= 0.5 * m.params_before
               for m in report.modules)


@pytest.mark.parametrize("argument", ["seq_len", "batch_size", "num_samples"])
def test_calibration_sizes_must_be_positive(argument, tiny_llama):
    with pytest.raises(ValueError, match=argument):
        ck.compress(tiny_llama, "asvd", 0.5, ["some text"] * 4, tokenizer=object(),
                    **{argument: 0})
