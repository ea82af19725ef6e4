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
