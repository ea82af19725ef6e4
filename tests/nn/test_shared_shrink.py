"""`share_input_shrinks`: factored q/k/v and gate/up siblings run one stacked shrink GEMM a
forward, eagerly and compiled, with the same outputs as the unshared modules."""

import copy

import pytest
import torch
import torch.nn.functional as F
from model_configs import model_outputs, sample_inputs, tiny_model
from torch import nn
from torch.overrides import TorchFunctionMode

import curkernels as ck
from curkernels import CURLinear
from curkernels.nn import find_linears, prepare_for_inference, share_input_shrinks, swap_linears
from curkernels.ops import dispatch, settings, tables, unavailable_reason
from curkernels.serve import StaticCacheGenerator

LAYERS = 2  # tiny_model's decoder blocks
GROUPS_PER_LAYER = 2  # q/k/v and gate/up


def _factored_llama(architecture: str = "llama") -> nn.Module:
    """Every projection factored: CUR with a full link (folded by prepare_for_inference) on
    q, v, gate and o, two factors on k, up and down, so that groups mix folded and two-factor
    members. Biases stay where the architecture has them (Qwen2: q, k, v)."""
    model = tiny_model(architecture)
    generator = torch.Generator().manual_seed(5)

    def factor(name: str, linear: nn.Linear) -> nn.Module:
        m, n = linear.weight.shape
        rank = 4 + len(name) % 5  # members of a group with different ranks
        if name.endswith(("k_proj", "up_proj", "down_proj")):
            return CURLinear.from_linear(linear, rank, link=False)
        return CURLinear(torch.randn(m, rank + 2, generator=generator) * 0.3,
                         torch.randn(rank + 2, rank, generator=generator),
                         torch.randn(rank, n, generator=generator) * 0.3,
                         None if linear.bias is None else linear.bias.detach())

    swap_linears(model, find_linears(model), factor)
    return prepare_for_inference(model)


def _stacked_weights(model: nn.Module) -> list[torch.Tensor]:
    shared = {id(m.shared_shrink): m.shared_shrink for m in model.modules()
              if getattr(m, "shared_shrink", None) is not None}
    return [s.weight for s in shared.values()]


class _CountLinears(TorchFunctionMode):
    """Counts F.linear calls on the given weights, by name."""

    def __init__(self, **weights: list[torch.Tensor]):
        super().__init__()
        self.ids = {name: {id(w) for w in group} for name, group in weights.items()}
        self.counts = dict.fromkeys(weights, 0)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.linear:
            for name, ids in self.ids.items():
                self.counts[name] += id(args[1]) in ids
        return func(*args, **(kwargs or {}))


def test_siblings_share_one_weight_and_outputs_stay():
    model = _factored_llama()
    inputs = sample_inputs()
    before = model_outputs(model, inputs)
    bytes_before = sum(p.numel() * p.element_size() for p in model.parameters())
    assert share_input_shrinks(model) == LAYERS * GROUPS_PER_LAYER
    torch.testing.assert_close(model_outputs(model, inputs), before, rtol=1e-5, atol=1e-5)
    assert sum(p.numel() * p.element_size() for p in model.parameters()) == bytes_before
    attention = model.model.layers[0].self_attn
    stacked = attention.q_proj.shared_shrink.weight
    members = (attention.q_proj, attention.k_proj, attention.v_proj)
    assert [m.shared_shrink for m in members] == [attention.q_proj.shared_shrink] * 3
    assert stacked.shape == (sum(m.rank for m in members), attention.q_proj.in_features)
    # each member's shrink factor is a view of its rows of the stacked weight, in member
    # order: stored once; and each member takes its own output of the group
    start = 0
    for index, member in enumerate(members):
        factor = member.R
        assert factor.untyped_storage().data_ptr() == stacked.untyped_storage().data_ptr()
        torch.testing.assert_close(factor, stacked[start:start + member.rank])
        assert member.shared_index == index
        start += member.rank
    assert attention.o_proj.shared_shrink is None


def test_one_shrink_gemm_per_group_and_nothing_kept():
    model = _factored_llama()
    share_input_shrinks(model)
    members = [m for m in model.modules() if getattr(m, "shared_shrink", None) is not None]
    assert len(members) == LAYERS * 5
    with torch.no_grad(), _CountLinears(
            stacked=_stacked_weights(model),
            own_shrinks=[m.R for m in members],
            expands=[m.C for m in members]) as counted:
        model(**sample_inputs())
    assert counted.counts == {"stacked": LAYERS * GROUPS_PER_LAYER, "own_shrinks": 0,
                              "expands": len(members)}
    assert all(member.shared_shrink._handed is None for member in members)


def test_members_given_other_inputs_or_changed_inputs_stay_correct():
    """A member matches the product to its own input: another tensor, or the same one changed
    in place, gets a new product."""
    model = _factored_llama()
    attention = model.model.layers[0].self_attn
    reference = copy.deepcopy(attention)
    share_input_shrinks(model)
    generator = torch.Generator().manual_seed(0)
    x, other = (torch.randn(3, attention.q_proj.in_features, generator=generator)
                for _ in range(2))
    with torch.no_grad():
        torch.testing.assert_close(attention.q_proj(x), reference.q_proj(x))
        x.mul_(2)
        torch.testing.assert_close(attention.k_proj(x), reference.k_proj(x))
        torch.testing.assert_close(attention.v_proj(other), reference.v_proj(other))
        torch.testing.assert_close(attention.q_proj(x), reference.q_proj(x))


def _shared_then_compiled(model: nn.Module, backend: str) -> torch.Tensor:
    """Asserts that greedy tokens of `model` shared and compiled with `backend` are those of
    the model before sharing (eager); returns the prompt."""
    input_ids = sample_inputs(batch=1)["input_ids"]
    expected = StaticCacheGenerator(model, max_seq_len=24).generate(input_ids, 6)
    share_input_shrinks(model)
    compiled = StaticCacheGenerator(model, max_seq_len=24, compile=True,
                                    compile_backend=backend)
    assert torch.equal(compiled.generate(input_ids, 6), expected)
    return input_ids


def test_compiled_decode_is_one_graph_with_one_group_op_per_group():
    model = _factored_llama()
    input_ids = _shared_then_compiled(model, "aot_eager")
    generator = StaticCacheGenerator(model, max_seq_len=24)
    generator.prefill(input_ids[:, :4])
    explanation = torch._dynamo.explain(generator.last_logits)(
        torch.tensor([[5]]), torch.tensor([4]))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    # one opaque group op a group, reading its stacked weight; no other node reads one
    stacked_shapes = {tuple(w.shape) for w in _stacked_weights(model)}
    nodes = [node for graph in explanation.graphs for node in graph.graph.nodes]
    groups = [node for node in nodes if node.target is torch.ops.curkernels.shared_group.default]
    assert len(groups) == LAYERS * GROUPS_PER_LAYER
    assert {tuple(node.args[1].meta["example_value"].shape) for node in groups} == stacked_shapes
    assert not [node for node in nodes if node.target is torch._C._nn.linear
                and tuple(node.args[1].meta["example_value"].shape) in stacked_shapes]


@pytest.mark.slow
def test_inductor_compiles_the_group_op():
    """inductor, not only aot_eager, lowers the opaque group op (a list of outputs, a list of
    optional biases: Qwen2's q/k/v have them) and generates what the unshared model does."""
    _shared_then_compiled(_factored_llama("qwen2"), "inductor")


def test_checkpoint_of_a_shared_model_loads_with_the_same_outputs(tmp_path):
    model = tiny_model("llama")
    ck.compress(model, method="svd", keep=0.5)
    prepare_for_inference(model, share_shrinks=True)
    assert _stacked_weights(model)
    inputs = sample_inputs()
    ck.save_compressed(model, tmp_path / "ckpt")
    loaded = ck.load_compressed(tmp_path / "ckpt")
    torch.testing.assert_close(model_outputs(loaded, inputs), model_outputs(model, inputs))


class _Siblings(nn.Module):
    def __init__(self, q: nn.Module, k: nn.Module):
        super().__init__()
        self.q_proj, self.k_proj = q, k


def _low_rank(m: int, n: int, rank: int = 3, **kwargs) -> CURLinear:
    return CURLinear(torch.randn(m, rank), None, torch.randn(rank, n), **kwargs).requires_grad_(
        False)


@pytest.mark.parametrize("q,k", [
    (lambda: CURLinear(torch.randn(8, 4), torch.randn(4, 3), torch.randn(3, 6)),
     lambda: _low_rank(8, 6)),                                  # a link not folded
    (lambda: _low_rank(8, 6, backend="torch"), lambda: _low_rank(8, 6)),  # a named backend
    (lambda: _low_rank(8, 6), lambda: _low_rank(8, 7)),          # different inputs
    (lambda: _low_rank(8, 6), lambda: nn.Linear(6, 8)),          # a group of one
])
def test_leaves_modules_that_cannot_share(q, k):
    parent = _Siblings(q(), k())
    assert share_input_shrinks(parent) == 0
    assert all(getattr(m, "shared_shrink", None) is None for m in parent.children())


def test_a_factor_being_trained_is_refused_by_name():
    parent = _Siblings(_low_rank(8, 6).requires_grad_(True), _low_rank(8, 6))
    with pytest.raises(ValueError, match=r"q_proj\.R requires grad.*prepare_for_inference"):
        share_input_shrinks(nn.Sequential(parent))


def test_bad_input_names_x():
    parent = _Siblings(_low_rank(8, 6), _low_rank(5, 6))
    assert share_input_shrinks(parent) == 1
    with pytest.raises(ValueError, match="x must have R's 6 features"):
        parent.q_proj(torch.randn(2, 7))
    with pytest.raises(TypeError, match="x has dtype torch.float64"):
        parent.k_proj(torch.randn(2, 6, dtype=torch.float64))
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        share_input_shrinks({"q_proj": parent.q_proj})


def test_a_model_cast_after_sharing_says_to_share_again():
    parent = _Siblings(_low_rank(8, 6), _low_rank(5, 6))
    share_input_shrinks(parent)
    parent.double()
    x = torch.randn(2, 6, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="call share_input_shrinks afterwards"):
        parent.q_proj(x)
    assert share_input_shrinks(parent) == 1
    expected = F.linear(F.linear(x, parent.q_proj.R), parent.q_proj.C)
    torch.testing.assert_close(parent.q_proj(x), expected)
    assert parent.q_proj.shared_shrink.weight.dtype == torch.float64


def _group_outputs(model, x):
    """Layer 0's q/k/v and gate/up outputs on x, in that order."""
    layer = model.model.layers[0]
    return [layer.self_attn.q_proj(x), layer.self_attn.k_proj(x), layer.self_attn.v_proj(x),
            layer.mlp.gate_proj(x), layer.mlp.up_proj(x)]


@pytest.mark.skipif(unavailable_reason("triton", torch.device("cpu")) is not None
                    and not torch.cuda.is_available(),
                    reason="needs the Triton interpreter (TRITON_INTERPRET=1) or a CUDA device")
@pytest.mark.parametrize("architecture", ("llama", "qwen2"))  # Qwen2: q/k/v with biases
def test_decode_through_the_group_kernel_matches_the_unshared_model(architecture, monkeypatch):
    """CURKERNELS_BACKEND=triton runs the group kernel wherever Triton runs (the interpreter on
    the CPU): one launch a group computes every member's output, so no GEMM reads a stacked
    or an expand factor, and the outputs are the unshared modules'."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = _factored_llama(architecture).to(device)
    hidden = model.model.layers[0].self_attn.q_proj.in_features
    inputs = [torch.randn(rows, hidden, device=device) for rows in (1, 5, 40)]
    with torch.no_grad():
        expected = [_group_outputs(model, x) for x in inputs]
    share_input_shrinks(model)
    members = [m for m in model.modules() if getattr(m, "shared_shrink", None) is not None]
    monkeypatch.setenv("CURKERNELS_BACKEND", "triton")
    settings.reload()
    for x, wanted in zip(inputs, expected, strict=True):
        with torch.no_grad(), _CountLinears(
                stacked=_stacked_weights(model),
                expands=[m.C for m in members]) as counted:
            outputs = _group_outputs(model, x)
        assert counted.counts == {"stacked": 0, "expands": 0}
        for output, reference in zip(outputs, wanted, strict=True):
            torch.testing.assert_close(output, reference, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_eager_decode_on_a_gpu_runs_the_group_kernel_where_measured_to_win(monkeypatch):
    """Where the GPU's group table has the group kernel win, eager decode rows on a GPU (up to
    64) run one group launch a group; prefill rows, the shared chain. Where it does not, each
    member's own `cur_linear` up to 16 rows and the shared chain past them; likewise with the
    CUDA extension named. A CUDA graph capture is served too."""
    model = _factored_llama().cuda()
    attention = model.model.layers[0].self_attn
    reference = copy.deepcopy(attention)
    share_input_shrinks(model)
    members = ("q_proj", "k_proj", "v_proj")
    stacked = attention.q_proj.shared_shrink.weight

    def measured(wins: bool) -> None:
        dispatch.group_choices.clear()
        monkeypatch.setattr(tables, "group_kernel_wins", lambda *args: wins)

    for wins, rows, stacked_gemms in ((True, 1, 0), (True, 16, 0), (True, 40, 0), (True, 65, 1),
                                      (False, 40, 1)):
        measured(wins)
        x = torch.randn(rows, attention.q_proj.in_features, device="cuda")
        with torch.no_grad(), _CountLinears(stacked=[stacked]) as counted:
            outputs = [getattr(attention, name)(x) for name in members]
        assert counted.counts["stacked"] == stacked_gemms
        for name, output in zip(members, outputs, strict=True):
            torch.testing.assert_close(output, getattr(reference, name)(x), rtol=1e-4,
                                       atol=1e-4)
    x = torch.randn(1, attention.q_proj.in_features, device="cuda")
    assert not attention.q_proj.shared_shrink.serves(x)
    measured(True)
    assert attention.q_proj.shared_shrink.serves(x)
    monkeypatch.setenv("CURKERNELS_BACKEND", "cuda")  # no group kernel: each member's own
    settings.reload()
    assert not attention.q_proj.shared_shrink.serves(x)
    monkeypatch.delenv("CURKERNELS_BACKEND")
    settings.reload()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            assert attention.q_proj.shared_shrink.serves(x)
