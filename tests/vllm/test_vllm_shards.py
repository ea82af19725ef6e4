"""Which part of each checkpoint tensor a tensor-parallel rank keeps (no vLLM needed)."""

import pytest
import torch

from curkernels.checkpoint.module_specs import CheckpointError
from curkernels.integrations.vllm_shards import plan_shards, take_local


def low_rank(m: int, n: int, r: int) -> dict:
    return {"type": "LowRankLinear", "in_features": n, "out_features": m, "rank": r,
            "bias": False}


def cur(m: int, n: int, r: int, u: str) -> dict:
    return {"type": "CURLinear", "in_features": n, "out_features": m, "rank": r, "inner": r,
            "u": u, "bias": True, "gather": False, "base_rows": None, "row_indices": None,
            "col_indices": None}


def test_column_parallel_rank_keeps_its_expand_rows_and_whole_shrinks():
    # q low-rank r=32, k CUR r=21 with diagonal U, v dense; rank 1 of 2 (k/v unreplicated)
    shards, sizes = plan_shards(["q", "k", "v"], [low_rank(128, 128, 32), cur(64, 128, 21, "diag"),
                                                  None],
                                [64, 32, 32], [64, 32, 32], 128, 0, "column")
    q, k, v = (shard.pieces for shard in shards)
    assert (q["A"].local_shape, q["A"].split_dim, q["A"].start) == ((64, 32), 0, 64)
    assert (q["B"].local_shape, q["B"].split_dim) == ((32, 128), None)
    assert (k["C"].local_shape, k["C"].start, k["U"].local_shape) == ((32, 21), 32, (21,))
    assert (k["R"].local_shape, k["R"].split_dim) == ((21, 128), None)
    assert (v["weight"].local_shape, v["weight"].start, v["weight"].full_shape) == (
        (32, 128), 32, None)
    assert sizes == {"A": 64 * 32, "B": 32 * 128, "C": 32 * 21, "U": 21, "R": 21 * 128,
                     "weight": 32 * 128}
    full = torch.arange(128 * 32.0).reshape(128, 32)
    assert torch.equal(take_local(q["A"], "A", "q", full), full[64:])


def test_row_parallel_rank_keeps_its_shrink_columns_and_whole_expand():
    shards, sizes = plan_shards(["o"], [cur(128, 256, 40, "full")], [128], [0], 128, 128, "row")
    pieces = shards[0].pieces
    assert (pieces["R"].local_shape, pieces["R"].split_dim, pieces["R"].start) == (
        (40, 128), 1, 128)
    assert pieces["C"].split_dim is None and pieces["U"].local_shape == (40, 40)
    full = torch.arange(40 * 256.0).reshape(40, 256)
    assert torch.equal(take_local(pieces["R"], "R", "o", full), full[:, 128:])
    assert sizes["R"] == 40 * 128 and sizes["C"] == 128 * 40


def test_shards_pack_one_after_another_in_a_flat_buffer():
    shards, sizes = plan_shards(["gate", "up"], [low_rank(256, 128, 40), low_rank(256, 128, 24)],
                                [256, 256], [0, 0], 128, 0, "replicated")
    assert [shard.pieces["B"].offset for shard in shards] == [0, 40 * 128]
    assert sizes["B"] == 64 * 128 and [shard.rank for shard in shards] == [40, 24]


def test_a_tensor_of_the_wrong_shape_is_named():
    shards, _ = plan_shards(["q"], [low_rank(128, 128, 32)], [128], [0], 128, 0, "replicated")
    with pytest.raises(CheckpointError, match=r"q\.B has shape \(31, 128\), expected \(32, 128\)"):
        take_local(shards[0].pieces["B"], "B", "q", torch.zeros(31, 128))


def test_a_dense_shard_too_small_for_this_rank_is_named():
    shards, _ = plan_shards(["v"], [None], [32], [32], 128, 0, "column")
    with pytest.raises(CheckpointError, match=r"v\.weight has shape \(48, 128\)"):
        take_local(shards[0].pieces["weight"], "weight", "v", torch.zeros(48, 128))


def test_a_spec_that_does_not_fit_the_layer_is_named():
    with pytest.raises(CheckpointError, match=r"modules\['q'\] has out_features=128"):
        plan_shards(["q"], [low_rank(128, 128, 32)], [256], [0], 128, 0, "replicated")
    with pytest.raises(CheckpointError, match=r"modules\['o'\] has in_features=128"):
        plan_shards(["o"], [low_rank(128, 128, 32)], [128], [0], 128, 64, "row")


def test_unknown_parallel_kind_is_refused():
    with pytest.raises(ValueError, match="parallel must be"):
        plan_shards(["q"], [None], [8], [0], 8, 0, "diagonal")


def narrow(m: int, n: int, rows=None, cols=None) -> dict:
    return {"type": "NarrowLinear", "in_features": n, "out_features": m, "bias": False,
            "row_indices": rows, "col_indices": cols, "scatter_rows": rows is not None,
            "gather_cols": cols is not None}


def test_column_parallel_rank_keeps_the_narrow_rows_in_its_output_range():
    # q keeps 5 of 8 rows (unsorted), v is dense; rank 1 of 2 holds rows 4..7 of each
    shards, sizes = plan_shards(["q", "v"], [narrow(8, 6, rows=[6, 1, 4, 7, 2]), None],
                                [4, 4], [4, 4], 6, 0, "column")
    q, v = shards
    assert (q.rows.positions, q.rows.local, q.cols) == ((0, 2, 3), (2, 0, 3), None)
    piece = q.pieces["weight"]
    assert (piece.full_shape, piece.local_shape, piece.positions) == ((5, 6), (3, 6), (0, 2, 3))
    assert v.pieces["weight"].offset == 3 * 6 and sizes == {"weight": 3 * 6 + 4 * 6}
    full = torch.arange(30.0).reshape(5, 6)
    assert torch.equal(take_local(piece, "weight", "q", full), full[[0, 2, 3]])


def test_row_parallel_rank_keeps_the_narrow_columns_in_its_input_range():
    shards, sizes = plan_shards(["down"], [narrow(6, 8, cols=[0, 3, 5, 6])], [6], [0], 4, 4,
                                "row")
    shard = shards[0]
    assert (shard.cols.positions, shard.cols.local, shard.rows) == ((2, 3), (1, 2), None)
    assert shard.pieces["weight"].local_shape == (6, 2) and sizes == {"weight": 12}
    full = torch.arange(24.0).reshape(6, 4)
    assert torch.equal(take_local(shard.pieces["weight"], "weight", "down", full), full[:, 2:])
    # a rank none of whose inputs were kept holds an empty piece
    none_here, _ = plan_shards(["down"], [narrow(6, 8, cols=[4, 5])], [6], [0], 4, 0, "row")
    assert none_here[0].pieces["weight"].local_shape == (6, 0)
