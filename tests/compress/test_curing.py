import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import curkernels as ck
from curkernels.compress.budget import factor_parameters
from curkernels.compress.curing import PAPER_MAX_RANK, cur_decompose, curing_rank, energy_rank
from curkernels.compress.layer_selection import angular_layer_scores, select_layers
from curkernels.compress.targets import CURING_DECODER_TARGETS, resolve_targets
from curkernels.nn import CURLinear


def low_rank_matrix(m, n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, k, generator=g, dtype=torch.float64) @ torch.randn(
        k, n, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("selection", ["deim", "qdeim", "greedy"])
def test_exactly_low_rank_matrix_recovered(selection):
    W = low_rank_matrix(60, 40, 7)
    f = cur_decompose(W, torch.rand(40, dtype=torch.float64) + 0.5, 7, selection=selection,
                      svd="exact")
    assert torch.equal(f.C, W[:, f.cols]) and torch.equal(f.R, W[f.rows])
    assert torch.linalg.norm(f.C @ f.U @ f.R - W) / torch.linalg.norm(W) < 1e-9


@pytest.mark.parametrize("svd", ["exact", "randomized"])
def test_error_falls_as_rank_grows(svd):
    g = torch.Generator().manual_seed(1)
    # decaying spectrum, like a trained weight
    W = torch.randn(80, 64, generator=g, dtype=torch.float64) @ torch.diag(
        0.9 ** torch.arange(64, dtype=torch.float64)) @ torch.randn(64, 64, generator=g,
                                                                     dtype=torch.float64)
    errors = []
    for rank in (4, 16, 32, 48):
        f = cur_decompose(W, None, rank, svd=svd)
        errors.append(float(torch.linalg.norm(f.C @ f.U @ f.R - W) / torch.linalg.norm(W)))
    assert errors == sorted(errors, reverse=True) and errors[-1] < 0.5 * errors[0]


def test_energy_rank_rule():
    W = low_rank_matrix(30, 20, 5)
    assert energy_rank(W, 1.0) == 5  # the rest of the spectrum is rounding
    assert energy_rank(W, 0.5) < energy_rank(W, 0.999)
    # all the energy of a full-rank matrix: every singular value, never one past the last
    assert energy_rank(low_rank_matrix(30, 20, 20), 1.0) == 20


def test_curing_rank_is_breakeven_capped():
    # breakeven r(m+n) + r² ≤ mn at keep=1
    m, n = 96, 64
    r = curing_rank(m, n, 1.0, None, 1)
    assert factor_parameters(m, n, r, "full") <= m * n < factor_parameters(m, n, r + 1, "full")
    assert curing_rank(4096, 4096, 1.0, PAPER_MAX_RANK, 1) == 256
    assert curing_rank(1024, 4096, 1.0, PAPER_MAX_RANK, 1) == 256


def test_llama_8b_shaped_follows_paper():
    """10 blocks × q/k/gate at min(breakeven, 256): 8.03 B → 7.32 B parameters. Built on the
    meta device: nothing is allocated."""
    config = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                         tie_word_embeddings=False)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    total = sum(p.numel() for p in model.parameters())
    assert round(total / 1e9, 2) == 8.03
    # angular scores: first and last are excluded even when smallest
    scores = torch.linspace(1, 0, 32)
    scores[0] = -1
    layers = select_layers(scores, 10)
    assert layers == list(range(21, 31))
    targets = resolve_targets(model, CURING_DECODER_TARGETS, layers=layers)
    assert len(targets) == 30
    saved = 0
    for linear in targets.values():
        m, n = linear.weight.shape
        rank = curing_rank(m, n, 1.0, PAPER_MAX_RANK, 1)
        assert rank == 256
        saved += m * n - factor_parameters(m, n, rank, "full")
    assert round((total - saved) / 1e9, 2) == 7.32


def test_select_layers_bounds():
    with pytest.raises(ValueError, match="layers"):
        select_layers(torch.rand(5), 4)


def test_angular_scores_in_unit_range(tiny_llama, batches):
    scores = angular_layer_scores(tiny_llama, batches)
    assert scores.shape == (5,) and bool(((scores >= 0) & (scores <= 1)).all())


def test_curing_decoder_defaults(tiny_llama, batches):
    report = ck.compress(tiny_llama, "curing", keep=1.0, calib=batches)
    names = [m.name for m in report.modules]
    layers = tiny_llama.config.compression_config["layers"]
    assert len(layers) == 3 and 0 not in layers and 4 not in layers  # 5 blocks: at most L−2
    assert len(names) == 9 and all(n.endswith(CURING_DECODER_TARGETS) for n in names)
    module = tiny_llama.get_submodule(names[0])
    assert isinstance(module, CURLinear)
    assert module.row_indices is not None and module.col_indices is not None
    out = tiny_llama(**batches[0]).logits
    assert torch.isfinite(out).all()


def test_curing_encoder_targets_every_block_linear(tiny_bert, batches):
    report = ck.compress(tiny_bert, "curing", keep=0.5, calib=batches, selection="qdeim")
    assert len(report.modules) == 3 * 6
    assert report.kept <= 0.5
    assert all(m.activation_error is not None for m in report.modules)
