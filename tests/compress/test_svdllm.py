"""SVD-LLM: one-shot, sequential (the closed-form fit to the dense outputs, calibrated block
by block) and Fisher-weighted (output side whitened too), through `compress()`."""

import copy
from types import SimpleNamespace

import pytest
import torch
from conftest import random_batches

import curkernels as ck
from curkernels.compress.calibration import (
    PairedInputStats,
    collect_linear_stats,
    output_fisher,
    paired_input_stats,
)
from curkernels.compress.svdllm import fitted_factors, unwhitened_factors, whitening_factor
from curkernels.compress.targets import block_linears


def paired_stats(x, x_hat):
    """The statistics `paired_input_stats` accumulates, from token matrices (tokens × n)."""
    x, x_hat = x.double(), x_hat.double()
    return PairedInputStats(x.shape[0], x_hat.sum(0), x.sum(0), x_hat.T @ x_hat, x.T @ x_hat)


def test_same_inputs_give_svdllm_factors_damping_included():
    torch.manual_seed(0)
    weight, x = torch.randn(24, 16), torch.randn(400, 16) * torch.linspace(0.1, 3, 16)
    stats = paired_stats(x, x)
    A, B, bias = fitted_factors(weight, None, stats, 5, damping=0.05)
    L = whitening_factor(stats.second_moment, 0.05)
    A0, B0 = unwhitened_factors(torch.linalg.svd(weight.double() @ L, full_matrices=False), L, 5)
    assert bias is None
    torch.testing.assert_close(A @ B, A0 @ B0)


def test_same_inputs_with_an_output_factor_give_fisher_svdllm_factors():
    """x̂ = x: the Fisher-weighted fit is one-shot Fisher SVD-LLM, W ≈ K⁻ᵀ[KᵀWL]_r L⁻¹."""
    torch.manual_seed(0)
    weight, x = torch.randn(24, 16), torch.randn(400, 16) * torch.linspace(0.1, 3, 16)
    g = torch.randn(24, 24).double()
    K = whitening_factor(g @ g.T / 24, 0.01)
    stats = paired_stats(x, x)
    A, B, _ = fitted_factors(weight, None, stats, 5, damping=0.05, output_factor=K)
    L = whitening_factor(stats.second_moment, 0.05)
    A0, B0 = unwhitened_factors(
        torch.linalg.svd(K.T @ weight.double() @ L, full_matrices=False), L, 5)
    A0 = torch.linalg.solve_triangular(K.T, A0, upper=True)
    torch.testing.assert_close(A @ B, A0 @ B0)
    plain_A, plain_B, _ = fitted_factors(weight, None, stats, 5, damping=0.05)
    assert not torch.allclose(A @ B, plain_A @ plain_B, atol=1e-3)  # K changed the truncation


def test_error_falls_with_rank_and_beats_refitting_the_weight():
    torch.manual_seed(0)
    weight, x = torch.randn(24, 16).double(), torch.randn(400, 16).double()
    x_hat = x + 0.3 * torch.randn(400, 16).double()  # inputs disturbed upstream
    stats = paired_stats(x, x_hat)
    errors = []
    for rank in (2, 6, 12, 16):
        A, B, _ = fitted_factors(weight, None, stats, rank, damping=0.0)
        errors.append(float((x @ weight.T - x_hat @ (A @ B).T).norm()))
    assert errors == sorted(errors, reverse=True)
    # at full rank the fit is the least-squares map from x̂ to the dense outputs: it beats the
    # dense weight itself on the disturbed inputs
    assert errors[-1] < float((x @ weight.T - x_hat @ weight.T).norm())


def test_exact_recovery_through_an_invertible_disturbance_and_a_shift():
    """x = P·x̂ + c exactly: the dense outputs are W·P·x̂ + (b + W·c), rank 3, so a rank-3 fit
    (with the bias absorbing the shift) reproduces them exactly."""
    torch.manual_seed(0)
    weight = (torch.randn(20, 3) @ torch.randn(3, 12)).double()
    bias, shift = torch.randn(20).double(), torch.randn(12).double()
    P = torch.eye(12).double() + 0.2 * torch.randn(12, 12).double()
    x_hat = torch.randn(300, 12).double()
    x = x_hat @ P.T + shift
    A, B, new_bias = fitted_factors(weight, bias, paired_stats(x, x_hat), 3, damping=0.0)
    torch.testing.assert_close(x_hat @ (A @ B).T + new_bias, x @ weight.T + bias, rtol=1e-6,
                               atol=1e-6)
    torch.testing.assert_close(A @ B, weight @ P, rtol=1e-6, atol=1e-6)


def test_paired_stats_from_two_models(tiny_bert, batches):
    dense = copy.deepcopy(tiny_bert)
    name = "encoder.layer.1.attention.self.query"
    with torch.no_grad():
        tiny_bert.encoder.layer[0].output.dense.weight.mul_(0.5)  # disturb upstream
    passes = [(b["attention_mask"].bool(), lambda b=b: dense(**b), lambda b=b: tiny_bert(**b))
              for b in batches]
    stats = paired_input_stats(name, dense.get_submodule(name), tiny_bert.get_submodule(name),
                               passes)
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    assert stats.tokens == tokens
    assert not torch.allclose(stats.cross, stats.gram)
    same = paired_input_stats(name, dense.get_submodule(name), dense.get_submodule(name),
                              [(m, a, None) for m, a, _ in passes])
    torch.testing.assert_close(same.cross, same.gram)
    torch.testing.assert_close(same.sum, same.dense_sum)


def test_paired_stats_not_reached_or_nan(tiny_bert, batches):
    stray = torch.nn.Linear(32, 32)
    linear = tiny_bert.encoder.layer[0].attention.self.query
    passes = [(None, lambda b=b: tiny_bert(**b), lambda b=b: tiny_bert(**b)) for b in batches]
    with pytest.raises(ValueError, match="did not reach"):
        paired_input_stats("stray", stray, linear, passes)
    with torch.no_grad():
        tiny_bert.embeddings.word_embeddings.weight[5] = float("nan")
    nan_batch = [{"input_ids": torch.full((1, 4), 5), "attention_mask": torch.ones(1, 4)}]
    with pytest.raises(ValueError, match="NaN"):
        paired_input_stats("q", linear, linear,
                           [(None, lambda: tiny_bert(**nan_batch[0]), None)])


@pytest.mark.parametrize("fixture", ["tiny_bert", "tiny_llama"])
def test_sequential_error_falls_as_keep_grows(fixture, batches, request):
    dense = request.getfixturevalue(fixture)
    with torch.no_grad():
        reference = dense(**batches[0])[0]
    errors = []
    for keep in (0.2, 0.5, 0.9):
        model = copy.deepcopy(dense)
        report = ck.compress(model, "svdllm", keep, batches, sequential=True)
        assert report.params_after <= keep * report.params_before
        assert len(report.modules) == len(block_linears(dense))
        with torch.no_grad():
            out = model(**batches[0])[0]
        errors.append(float((out - reference).norm() / reference.norm()))
    assert errors == sorted(errors, reverse=True)


def test_sequential_with_global_ranks(tiny_bert, batches):
    report = ck.compress(tiny_bert, "svdllm", 0.4, batches, sequential=True,
                         allocation="global")
    assert report.params_after <= 0.4 * report.params_before
    assert len({m.rank for m in report.modules}) > 1
    # every option is recorded, the defaults too, as the config held them
    assert tiny_bert.config.compression_config["options"] == ck.SVDLLMConfig(
        sequential=True, allocation="global").options()


def test_sequential_outside_the_blocks_is_one_shot_svdllm(tiny_llama, batches):
    """lm_head alone: nothing upstream is compressed, so x̂ = x and the fit is SVD-LLM's."""
    one_shot = copy.deepcopy(tiny_llama)
    ck.compress(one_shot, "svdllm", 0.5, batches, targets=["lm_head"])
    report = ck.compress(tiny_llama, "svdllm", 0.5, batches, targets=["lm_head"],
                         sequential=True)
    assert [m.name for m in report.modules] == ["lm_head"]
    torch.testing.assert_close(tiny_llama.lm_head.to_dense().weight,
                               one_shot.lm_head.to_dense().weight, rtol=1e-4, atol=1e-5)


def test_bad_sequential(tiny_bert, batches):
    with pytest.raises(ValueError, match="sequential"):
        ck.compress(tiny_bert, "svdllm", 0.4, batches, sequential="yes")


class ProjectionEncoder(torch.nn.Module):
    """Embedding then one Linear whose output *is* last_hidden_state: the output gradient of
    the calibration loss is the sampled target noise, so E[ggᵀ] = E[std(h)²]·I exactly."""

    def __init__(self, vocab=50, width=8, out=6):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        self.proj = torch.nn.Linear(width, out)

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(last_hidden_state=self.proj(self.embed(input_ids)))


def test_output_fisher_is_the_noise_metric_at_the_output():
    torch.manual_seed(0)
    model = ProjectionEncoder()
    batches = random_batches(count=30, batch=8, length=16, pad_last=4)
    for b in batches:
        b["input_ids"] = b["input_ids"] % 50
    fisher = output_fisher(model, {"proj": model.proj}, batches)["proj"]
    with torch.no_grad():
        variances, counts = [], []
        for b in batches:
            h = model(**b).last_hidden_state[b["attention_mask"].bool()]
            variances.append(float(h.std()) ** 2)
            counts.append(h.shape[0])
    expected = sum(v * c for v, c in zip(variances, counts, strict=True)) / sum(counts)
    torch.testing.assert_close(fisher, expected * torch.eye(6, dtype=torch.float64),
                               rtol=0, atol=0.1 * expected)
    assert all(p.requires_grad for p in model.parameters())  # flags restored


def test_pooled_output_fisher_ignores_what_leaves_the_embedding_unchanged():
    """With the normalised mean-pooled embedding e as the target, an output change along e
    (a rescaling, which normalisation undoes) costs nothing: eᵀFe = 0 for one fixed sentence.
    The token-wise target charges that direction like any other."""
    torch.manual_seed(0)
    model = ProjectionEncoder()
    sentence = torch.randint(0, 50, (1, 12))
    batches = [{"input_ids": sentence.repeat(4, 1),
                "attention_mask": torch.ones(4, 12, dtype=torch.int64)} for _ in range(20)]
    with torch.no_grad():
        e = torch.nn.functional.normalize(model(sentence).last_hidden_state.mean(1), dim=-1)
    e = e.double().reshape(-1)
    for target, blind in (("pooled", True), ("tokens", False)):
        fisher = output_fisher(model, {"proj": model.proj}, batches,
                               encoder_target=target)["proj"]
        along_e = float(e @ fisher @ e) / float(fisher.trace())
        assert (along_e < 1e-9) == blind, (target, along_e)


@pytest.mark.parametrize("fixture, options", [
    ("tiny_bert", {}), ("tiny_llama", {}), ("tiny_bert", {"encoder_target": "pooled"}),
    ("tiny_bert", {"sequential": True})])
def test_fisher_weighting_error_falls_as_keep_grows(fixture, options, batches, request):
    dense = request.getfixturevalue(fixture)
    errors = []
    for keep in (0.2, 0.5, 0.9):
        model = copy.deepcopy(dense)
        report = ck.compress(model, "svdllm", keep, batches, weighting="fisher", **options)
        assert report.params_after <= keep * report.params_before
        errors.append(sum(m.relative_error for m in report.modules))
    assert errors == sorted(errors, reverse=True)


def test_fisher_weighting_global_allocation_keeps_the_budget(tiny_bert, batches):
    report = ck.compress(tiny_bert, "svdllm", 0.4, batches, weighting="fisher",
                         allocation="global")
    assert report.params_after <= 0.4 * report.params_before
    assert len({m.rank for m in report.modules}) > 1


@pytest.mark.parametrize("options,match", [({"weighting": "hessian"}, "weighting"),
                                           ({"fisher_damping": -1.0}, "damping"),
                                           ({"encoder_target": "pooled"}, "weighting='fisher'"),
                                           ({"weighting": "fisher", "encoder_target": "cls"},
                                            "encoder_target"),
                                           ({"centered": 1}, "centered")])
def test_bad_weighting(tiny_bert, batches, options, match):
    with pytest.raises(ValueError, match=match):
        ck.compress(tiny_bert, "svdllm", 0.4, batches, **options)


def test_pooled_target_is_for_encoders(tiny_llama, batches):
    with pytest.raises(ValueError, match="sentence encoders"):
        ck.compress(tiny_llama, "svdllm", 0.4, batches, weighting="fisher",
                    encoder_target="pooled")


def test_centered_one_shot_is_the_bias_absorbing_fit(tiny_bert, batches):
    """centered=True: each Linear's factors and bias are the closed-form minimiser of
    E‖Wx + b − (ABx + b̂)‖² over the calibration tokens — `fitted_factors` with x̂ = x."""
    dense = copy.deepcopy(tiny_bert)
    targets = block_linears(dense)
    stats = collect_linear_stats(dense, targets, batches, gram=True)
    report = ck.compress(tiny_bert, "svdllm", 0.4, batches, centered=True)
    for module in report.modules:
        linear, s = targets[module.name], stats[module.name]
        paired = PairedInputStats(s.tokens, s.in_sum, s.in_sum, s.gram, s.gram)
        A, B, bias = fitted_factors(linear.weight, linear.bias.detach(), paired, module.rank,
                                    damping=1e-4)
        low = tiny_bert.get_submodule(module.name)
        torch.testing.assert_close(low.C.double() @ low.R.double(), A @ B, rtol=1e-4,
                                   atol=1e-5)
        torch.testing.assert_close(low.bias.double(), bias, rtol=1e-4, atol=1e-5)


def test_centering_lowers_the_output_error_when_inputs_have_a_mean():
    """Centred, the fit does not see a constant shift of the inputs (the bias takes it);
    uncentred whitening spends part of the rank on the mean input and does worse, more so
    the larger the mean."""
    batches = random_batches(count=6, batch=8, length=16)
    for b in batches:
        b["input_ids"] = b["input_ids"] % 50

    def output_error(shift, **options):
        torch.manual_seed(0)
        dense = ProjectionEncoder(width=16, out=16)
        with torch.no_grad():
            dense.embed.weight.add_(torch.randn(16) * shift)
        model = copy.deepcopy(dense)
        ck.compress(model, "svdllm", 0.5, batches, targets=["proj"], **options)
        with torch.no_grad():
            return sum(float((model(**b).last_hidden_state - dense(**b).last_hidden_state)
                             [b["attention_mask"].bool()].pow(2).sum()) for b in batches)

    centered = [output_error(shift, centered=True) for shift in (0, 10)]
    plain = [output_error(shift) for shift in (0, 10)]
    assert abs(centered[1] - centered[0]) < 1e-3 * centered[0], centered
    assert centered[0] < plain[0] < plain[1], (centered, plain)
    assert centered[1] < 0.95 * plain[1], (centered, plain)
