"""Token weighting of pair-wise refits: weighted paired sums, and the post-norms it finds
(Gemma 3 normalises o_proj's and down_proj's outputs before the residual add; Llama does not)."""

import copy

import pytest
import torch
from conftest import random_batches
from model_configs import tiny_model
from test_pairwise_qk_norm import tiny_gemma3

import curkernels as ck
from curkernels import NarrowLinear
from curkernels.compress import pairwise
from curkernels.compress.calibration import paired_input_stats


def test_token_weights_weigh_the_paired_sums_pads_excluded():
    torch.manual_seed(0)
    linear = torch.nn.Linear(6, 4)
    inputs = [torch.randn(2, 5, 6) for _ in range(2)]
    masks = [torch.ones(2, 5, dtype=torch.bool) for _ in inputs]
    masks[0][1, 3:] = False
    weights = [torch.rand(2, 5) + 0.1 for _ in inputs]
    weights[0][1, 3:] = 1e6  # on pads: must not count
    passes = [(mask, lambda x=x: linear(x), None)
              for mask, x in zip(masks, inputs, strict=True)]
    stats = paired_input_stats("linear", linear, linear, passes, token_weights=weights)
    x = torch.cat([x[mask] for x, mask in zip(inputs, masks, strict=True)]).double()
    w = torch.cat([w[mask] for w, mask in zip(weights, masks, strict=True)]).double()
    assert stats.tokens == x.shape[0] == 18
    assert stats.weight == pytest.approx(float(w.sum()))
    torch.testing.assert_close(stats.second_moment, (x.T * w) @ x / w.sum())
    torch.testing.assert_close(stats.cross_moment, (x.T * w) @ x / w.sum())
    torch.testing.assert_close(stats.mean, (w[:, None] * x).sum(0) / w.sum())
    torch.testing.assert_close(stats.mean_sq, (w[:, None] * x * x).sum(0) / w.sum())
    with pytest.raises(ValueError, match=r"token_weights\[0\]"):
        paired_input_stats("linear", linear, linear, passes,
                           token_weights=[w[:, :4] for w in weights])


def weights_seen(monkeypatch) -> list[tuple[str, set, list | None]]:
    """(refit target, the targets the block normalises, its token weights) of each refit."""
    seen = []
    original = pairwise._BlockCompressor._token_weights

    def spy(self, local):
        weights = original(self, local)
        seen.append((local, set(self.normalised), weights))
        return weights
    monkeypatch.setattr(pairwise._BlockCompressor, "_token_weights", spy)
    return seen


def narrow_weights(model) -> list[torch.Tensor]:
    return [m.weight for m in model.modules() if isinstance(m, NarrowLinear)]


def test_default_weighs_gemma_tokens_by_their_normalised_output(monkeypatch):
    seen = weights_seen(monkeypatch)
    dense, calib = tiny_gemma3(), random_batches()
    uniform = copy.deepcopy(dense)
    ck.compress(uniform, keep=0.7, calib=calib, token_weighting="uniform")
    assert [weights for _, _, weights in seen] == [None] * 4
    seen.clear()
    model = copy.deepcopy(dense)
    report = ck.compress(model, keep=0.7, calib=calib)  # the default: output_norm
    assert report.params_after <= 0.7 * report.params_before
    assert [local for local, _, _ in seen] == ["self_attn.o_proj", "mlp.down_proj"] * 2
    for _, normalised, weights in seen:
        assert normalised == {"self_attn.o_proj", "mlp.down_proj"}
        assert len(weights) == len(calib) and weights[0].shape == calib[0]["input_ids"].shape
        assert weights[0].std() > 0.05 * weights[0].mean()  # tokens are weighed apart
    assert any(not torch.equal(a, b)
               for a, b in zip(narrow_weights(model), narrow_weights(uniform), strict=True))
    # block 0 sees the dense model's inputs: its o_proj weights are 1/E[y²] of the dense output
    outputs = []
    hook = dense.model.layers[0].self_attn.o_proj.register_forward_hook(
        lambda module, args, output: outputs.append(output.double()))
    with torch.no_grad():
        for batch in calib:
            dense(**batch)
    hook.remove()
    for weight, output in zip(seen[0][2], outputs, strict=True):
        torch.testing.assert_close(weight, 1 / output.square().mean(-1))


def test_output_norm_changes_nothing_where_outputs_are_added_as_they_are(monkeypatch):
    seen = weights_seen(monkeypatch)
    dense, calib = tiny_model("llama"), random_batches()
    uniform, weighted = copy.deepcopy(dense), copy.deepcopy(dense)
    ck.compress(uniform, keep=0.6, calib=calib, token_weighting="uniform")
    ck.compress(weighted, keep=0.6, calib=calib)
    assert all(normalised == set() and weights is None for _, normalised, weights in seen)
    for a, b in zip(narrow_weights(weighted), narrow_weights(uniform), strict=True):
        assert torch.equal(a, b)


def test_unknown_token_weighting_is_named():
    with pytest.raises(ValueError, match="token_weighting"):
        ck.compress(tiny_model("llama"), keep=0.6, calib=random_batches(),
                    token_weighting="tokens")
