"""Pair-wise structured compression: narrower dense MLPs and attention heads made of real rows
of the dense weights, refits on calibration data, budgets, checkpoints and generation."""

import copy

import pytest
import torch
from conftest import random_batches
from model_configs import model_outputs, sample_inputs, tiny_model
from transformers import AutoModelForCausalLM

import curkernels as ck
from curkernels import NarrowLinear
from curkernels.compress.calibration import PairedInputStats
from curkernels.compress.pairwise import refit_on_kept_inputs
from curkernels.compress.pairwise_budget import block_keeps, group_keeps

ARCHITECTURES = ["llama", "qwen2"]


def compressed(architecture, keep=0.6, **opts):
    model = tiny_model(architecture)
    dense = copy.deepcopy(model)
    report = ck.compress(model, keep=keep, calib=random_batches(), **opts)
    return dense, model, report


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_decoder_default_is_pairwise_with_narrow_layers_of_real_rows(architecture):
    dense, model, report = compressed(architecture)
    assert report.method == "pairwise" and model.config.compression_config["method"] == "pairwise"
    heads, kv_heads = model.config.num_attention_heads, model.config.num_key_value_heads
    dim = model.config.hidden_size // heads
    for layer, dense_layer in zip(model.model.layers, dense.model.layers, strict=True):
        attn, mlp = layer.self_attn, layer.mlp
        assert all(isinstance(m, NarrowLinear) for m in (
            attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj,
            mlp.down_proj))
        for local in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                      "mlp.gate_proj", "mlp.up_proj"):
            narrow, linear = layer.get_submodule(local), dense_layer.get_submodule(local)
            assert torch.equal(narrow.weight, linear.weight[narrow.row_indices])
            if linear.bias is not None:
                assert torch.equal(narrow.bias, linear.bias[narrow.row_indices])
        # the MLP is narrower, with no scatter: gate/up keep the same neurons down reads
        kept = mlp.gate_proj.row_indices
        assert torch.equal(mlp.up_proj.row_indices, kept)
        assert torch.equal(mlp.down_proj.col_indices, kept)
        assert mlp.gate_proj.out_features == mlp.down_proj.in_features == len(kept) < 80
        # q/k keep rotary pairs (i, i + d/2), the same in every query head of a group
        k_dims = attn.k_proj.row_indices.reshape(-1) % (kv_heads * dim)
        k_mask = torch.zeros(kv_heads, dim, dtype=torch.bool)
        k_mask.view(-1)[k_dims] = True
        assert torch.equal(k_mask[:, :dim // 2], k_mask[:, dim // 2:])
        q_mask = torch.zeros(heads, dim, dtype=torch.bool)
        q_mask.view(-1)[attn.q_proj.row_indices] = True
        assert torch.equal(q_mask, k_mask.repeat_interleave(heads // kv_heads, 0))
        # o_proj reads exactly the v dimensions kept, for every query head of the group
        v_mask = torch.zeros(kv_heads, dim, dtype=torch.bool)
        v_mask.view(-1)[attn.v_proj.row_indices] = True
        o_mask = torch.zeros(heads * dim, dtype=torch.bool)
        o_mask[attn.o_proj.col_indices] = True
        assert torch.equal(o_mask, v_mask.repeat_interleave(heads // kv_heads, 0).flatten())
    out = model_outputs(model, sample_inputs())
    assert torch.isfinite(out).all() and out.shape[-1] == 96


@pytest.mark.parametrize("keep", [0.8, 0.5, 0.3])
def test_stored_parameters_stay_within_keep(keep):
    _, model, report = compressed("llama", keep=keep)
    stored = sum(m.weight.numel() for m in model.modules() if isinstance(m, NarrowLinear))
    assert stored == report.params_after <= keep * report.params_before
    assert report.params_after >= (keep - 0.15) * report.params_before  # not wasted either


@pytest.mark.parametrize("option", [dict(allocation="uniform"), dict(sequential=False),
                                    dict(selection="leverage")])
def test_ablations_run_and_keep_the_budget(option):
    _, _, report = compressed("qwen2", keep=0.6, **option)
    assert report.params_after <= 0.6 * report.params_before


def calibration_error(**options) -> float:
    """Squared output error of the tiny Llama compressed at keep 0.5, on its calibration."""
    calib = random_batches()
    dense = tiny_model("llama")
    model = copy.deepcopy(dense)
    ck.compress(model, keep=0.5, calib=calib, **options)
    return sum(float((model_outputs(model, b) - model_outputs(dense, b)).pow(2).mean())
               for b in calib)


def test_refit_beats_keeping_the_dense_columns_on_calibration_data():
    assert calibration_error(refit=True) < 0.8 * calibration_error(refit=False)


def test_greedy_selection_lowers_the_calibration_error():
    # measured: 0.00129 against 0.00170
    assert calibration_error(selection="greedy") < 0.9 * calibration_error(selection="leverage")


def test_refit_is_the_least_squares_fit_to_the_dense_outputs():
    torch.manual_seed(0)
    weight, bias = torch.randn(12, 10).double(), torch.randn(12).double()
    x = torch.randn(500, 10).double() @ torch.randn(10, 10).double() + 0.5
    x_hat = x + 0.1 * torch.randn(500, 10).double()
    kept = torch.tensor([0, 2, 3, 7, 9])
    stats = PairedInputStats(500, x_hat.sum(0), x.sum(0), x_hat.T @ x_hat, x.T @ x_hat)
    refit, new_bias = refit_on_kept_inputs(weight, bias, stats, kept, 1e-12)
    design = torch.cat([x_hat[:, kept], torch.ones(500, 1).double()], 1)
    solution = torch.linalg.lstsq(design, x @ weight.T + bias).solution
    torch.testing.assert_close(refit, solution[:-1].T)
    torch.testing.assert_close(new_bias, solution[-1])


def test_block_keeps_spend_the_budget_and_favour_important_blocks():
    keeps = block_keeps(torch.tensor([0.1, 0.3, 0.05, 0.2]), [10, 10, 10, 30], 0.6, 0.1)
    total = sum(k * s for k, s in zip(keeps, [10, 10, 10, 30], strict=True))
    assert total == pytest.approx(0.6 * 60)
    assert keeps[1] > keeps[3] > keeps[0] > keeps[2]
    clamped = block_keeps(torch.tensor([1.0, 0.0]), [1, 1], 0.5, 0.01, floor=0.2)
    assert clamped == pytest.approx([0.8, 0.2])


def test_attention_drop_ratios_move_the_budget_to_the_mlp():
    _, model, report = compressed("llama", keep=0.6, qk_drop=0.0, vo_drop=0.5)
    even = compressed("llama", keep=0.6, qk_drop=1.0, vo_drop=1.0)[1]
    assert report.params_after <= 0.6 * report.params_before
    for layer, even_layer in zip(model.model.layers, even.model.layers, strict=True):
        attn, mlp = layer.self_attn, layer.mlp
        assert len(attn.q_proj.row_indices) == attn.q_proj.dense_out_features  # q/k kept whole
        assert len(attn.k_proj.row_indices) == attn.k_proj.dense_out_features
        v_kept = len(attn.v_proj.row_indices) / attn.v_proj.dense_out_features
        mlp_kept = len(mlp.gate_proj.row_indices) / mlp.gate_proj.dense_out_features
        assert 1 - v_kept == pytest.approx((1 - mlp_kept) / 2, abs=0.1)
        assert len(mlp.gate_proj.row_indices) < len(even_layer.mlp.gate_proj.row_indices)


def test_group_keeps_spend_the_block_budget_by_ratio():
    groups = [("q_proj", "k_proj"), ("v_proj", "o_proj"), ("gate_proj", "up_proj", "down_proj")]
    keeps = group_keeps(groups, [10, 10, 40], 0.7, qk_drop=0.0, vo_drop=0.5)
    assert keeps[0] == 1.0
    assert 1 - keeps[1] == pytest.approx((1 - keeps[2]) / 2)
    assert sum(k * s for k, s in zip(keeps, [10, 10, 40], strict=True)) == pytest.approx(42)
    # a group that would drop past the floor stops there; the others take the rest
    clamped = group_keeps(groups, [10, 10, 10], 0.4, qk_drop=10.0, vo_drop=1.0)
    assert clamped[0] == pytest.approx(0.05)
    assert sum(clamped) * 10 == pytest.approx(12)
    with pytest.raises(ValueError, match="qk_drop=0, vo_drop=0: a block that keeps 0.100"):
        group_keeps(groups, [10, 10, 40], 0.1, qk_drop=0.0, vo_drop=0.0)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_checkpoint_round_trip_and_generation(tmp_path, architecture):
    _, model, _ = compressed(architecture)
    inputs = sample_inputs()
    expected = model_outputs(model, inputs)
    ck.save_compressed(model, tmp_path / "out")
    for reloaded in (ck.load_compressed(tmp_path / "out"),
                     AutoModelForCausalLM.from_pretrained(tmp_path / "out")):
        gate = reloaded.model.layers[1].mlp.gate_proj
        assert isinstance(gate, NarrowLinear)
        assert torch.equal(gate.row_indices, model.model.layers[1].mlp.gate_proj.row_indices)
        assert torch.equal(model_outputs(reloaded, inputs), expected)
        generated = reloaded.generate(inputs["input_ids"][:1], max_new_tokens=4, do_sample=False)
        assert generated.shape == (1, inputs["input_ids"].shape[1] + 4)


def test_methods_tuple_and_model_kind_defaults(tiny_bert):
    assert isinstance(ck.METHODS, tuple)
    assert {"svd", "asvd", "svdllm", "curing", "rom", "lpaf", "pairwise"} == set(ck.METHODS)
    assert ck.compress(tiny_bert, keep=0.5).method == "svd"


def test_bad_options_and_partial_groups_are_named():
    calib = random_batches()
    with pytest.raises(ValueError, match="allocation must be one of"):
        ck.compress(tiny_model("llama"), method="pairwise", calib=calib, allocation="greedy")
    with pytest.raises(ValueError, match="ridge must be a finite number > 0"):
        ck.compress(tiny_model("llama"), method="pairwise", calib=calib, ridge=0)
    with pytest.raises(ValueError, match="qk_drop must be a finite number ≥ 0"):
        ck.compress(tiny_model("llama"), method="pairwise", calib=calib, qk_drop=-1.0)
    with pytest.raises(ValueError, match=r"gate_proj/up_proj/down_proj together.*down_proj"):
        ck.compress(tiny_model("llama"), method="pairwise", calib=calib,
                    targets=["gate_proj", "up_proj"])
    with pytest.raises(ValueError, match=r"unknown option \['rank'\] for method 'pairwise'"):
        ck.compress(tiny_model("llama"), method="pairwise", calib=calib, rank=3)
    with pytest.raises(ValueError, match="needs calibration data"):
        ck.compress(tiny_model("llama"), keep=0.5)
