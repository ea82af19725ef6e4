"""Compressed checkpoints generate: save → from_pretrained → greedy tokens identical to the
in-memory model on the torch reference modules; the static-cache path (eager and compiled,
no graph breaks) agrees with transformers' own `generate`."""

import copy

import pytest
import torch
from conftest import ARCHITECTURES, tiny_causal_lm
from transformers import AutoModelForCausalLM

import curkernels as ck
from curkernels.nn import CURLinear, prepare_for_inference, share_input_shrinks
from curkernels.ops import dispatch, tables
from curkernels.serve import StaticCacheGenerator

NEW_TOKENS = 12


def factored_modules(model) -> list:
    return [m for m in model.modules() if isinstance(m, CURLinear)]


def on_reference_backend(model):
    """A copy of `model` whose factored modules run the unfused torch reference."""
    reference = copy.deepcopy(model)
    for module in factored_modules(reference):
        module.backend = "torch"
    return reference


def hf_greedy(model, input_ids: torch.Tensor) -> torch.Tensor:
    return model.generate(input_ids, max_new_tokens=NEW_TOKENS, do_sample=False,
                          eos_token_id=0, pad_token_id=0)


def prompt(vocab_size: int, batch: int = 1, length: int = 7, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab_size, (batch, length), generator=generator)


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def compressed(request, tokenizer):
    model = tiny_causal_lm(request.param, len(tokenizer))
    dense_logits = model(prompt(len(tokenizer))).logits
    ck.compress(model, method="svd", keep=0.5)
    return request.param, model, dense_logits


def test_checkpoint_generates_like_reference_modules(compressed, tokenizer, tmp_path):
    architecture, model, dense_logits = compressed
    ck.save_compressed(model, tmp_path / architecture, tokenizer=tokenizer)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / architecture).eval()
    assert len(factored_modules(loaded)) == len(factored_modules(model)) == 14
    reference = on_reference_backend(model)
    input_ids = prompt(len(tokenizer))
    with torch.no_grad():
        loaded_logits = loaded(input_ids).logits
        torch.testing.assert_close(loaded_logits, reference(input_ids).logits)
    # the checkpoint holds the compressed model, not the dense one
    assert (loaded_logits - dense_logits).abs().max() > 1e-3
    tokens = hf_greedy(loaded, input_ids)
    assert tokens.shape[1] > input_ids.shape[1]
    assert torch.equal(tokens, hf_greedy(reference, input_ids))


def test_static_cache_eager_matches_generate(compressed, tokenizer):
    _, model, _ = compressed
    input_ids = prompt(len(tokenizer), batch=2)
    generator = StaticCacheGenerator(model, batch_size=2, max_seq_len=32)
    expected = model.generate(input_ids, max_new_tokens=NEW_TOKENS, do_sample=False,
                              eos_token_id=None, pad_token_id=0)
    assert torch.equal(generator.generate(input_ids, NEW_TOKENS), expected)
    # a second request on the same cache starts clean
    assert torch.equal(generator.generate(input_ids, NEW_TOKENS), expected)


@pytest.mark.parametrize("chunk_tokens", (1, 6, 7))  # 1 and 3 positions a chunk, uneven ends
def test_chunked_prefill_matches_one_forward(compressed, tokenizer, chunk_tokens):
    _, model, _ = compressed
    input_ids = prompt(len(tokenizer), batch=2)
    whole = StaticCacheGenerator(model, batch_size=2, max_seq_len=32)
    chunked = StaticCacheGenerator(model, batch_size=2, max_seq_len=32,
                                   prefill_chunk_tokens=chunk_tokens)
    torch.testing.assert_close(chunked.prefill(input_ids), whole.prefill(input_ids))
    assert torch.equal(chunked.generate(input_ids, NEW_TOKENS),
                       whole.generate(input_ids, NEW_TOKENS))


def test_prefill_chunk_must_be_positive(compressed):
    _, model, _ = compressed
    with pytest.raises(ValueError, match="prefill_chunk_tokens"):
        StaticCacheGenerator(model, max_seq_len=32, prefill_chunk_tokens=0)


def test_compiled_fullgraph_matches_eager_generate(compressed, tokenizer):
    """aot_eager traces exactly what inductor would (fullgraph: any graph break raises) and
    stays fast on CPU; the inductor test below compiles one model for real."""
    architecture, model, _ = compressed
    input_ids = prompt(len(tokenizer))
    generator = StaticCacheGenerator(model, max_seq_len=32, compile=True,
                                     compile_prefill=architecture == "llama",
                                     compile_backend="aot_eager")
    generated = generator.generate(input_ids, NEW_TOKENS, eos_token_ids=[0])
    assert torch.equal(generated, hf_greedy(model, input_ids))


def test_decode_step_is_one_graph_with_curkernels_ops(compressed, tokenizer):
    _, model, _ = compressed
    generator = StaticCacheGenerator(model, max_seq_len=16)
    generator.prefill(prompt(len(tokenizer), length=4))
    explanation = torch._dynamo.explain(generator.last_logits)(
        torch.tensor([[5]]), torch.tensor([4]))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    ops = [node for graph in explanation.graphs for node in graph.graph.nodes
           if "cur_linear" in str(node.target)]
    assert len(ops) == len(factored_modules(model))


@pytest.mark.slow
def test_inductor_compiled_decode_matches_eager(tokenizer):
    model = tiny_causal_lm("llama", len(tokenizer))
    ck.compress(model, method="svd", keep=0.5)
    input_ids = prompt(len(tokenizer))
    eager = StaticCacheGenerator(model, max_seq_len=24).generate(input_ids, NEW_TOKENS)
    compiled = StaticCacheGenerator(model, max_seq_len=24, compile=True)
    assert torch.equal(compiled.generate(input_ids, NEW_TOKENS), eager)


def test_stream_stops_at_end_of_sequence(compressed, tokenizer):
    _, model, _ = compressed
    input_ids = prompt(len(tokenizer))
    generator = StaticCacheGenerator(model, max_seq_len=32)
    first = int(next(generator.stream(input_ids, 4))[0])
    steps = list(generator.stream(input_ids, 8, eos_token_ids=[first]))
    assert len(steps) == 1 and int(steps[0][0]) == first


def test_seeded_sampling_repeats(compressed, tokenizer):
    _, model, _ = compressed
    input_ids = prompt(len(tokenizer))
    generator = StaticCacheGenerator(model, max_seq_len=32)
    runs = [generator.generate(input_ids, NEW_TOKENS, temperature=1.5, top_p=0.9, seed=s)
            for s in (3, 3, 4)]
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


@pytest.mark.parametrize("kwargs, match", [
    ({"batch": 2}, "batch_size"),
    ({"length": 30}, "max_seq_len"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"temperature": -1.0}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
])
def test_bad_requests_name_the_argument(compressed, tokenizer, kwargs, match):
    _, model, _ = compressed
    kwargs = dict(kwargs)
    generator = StaticCacheGenerator(model, max_seq_len=32)
    input_ids = prompt(len(tokenizer), batch=kwargs.pop("batch", 1),
                       length=kwargs.pop("length", 7))
    with pytest.raises(ValueError, match=match):
        generator.generate(input_ids, kwargs.pop("max_new_tokens", 4), **kwargs)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_decode_matches_generate_on_gpu(tokenizer):
    """On a GPU the compiled step runs under CUDA graphs (mode reduce-overhead) with the
    backend dispatch of a real device; eager `generate` uses the fused decode kernels."""
    model = tiny_causal_lm("llama", len(tokenizer)).cuda()
    ck.compress(model, method="svd", keep=0.5)
    input_ids = prompt(len(tokenizer)).cuda()
    expected = hf_greedy(model, input_ids)
    generator = StaticCacheGenerator(model, max_seq_len=32, compile=True, compile_prefill=True)
    for _ in range(3):  # warm-up, recording, then replay of the recorded graphs
        assert torch.equal(generator.generate(input_ids, NEW_TOKENS, eos_token_ids=[0]),
                           expected)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("group_kernel_wins", (False, True))
def test_cuda_graph_decode_with_shared_shrinks_matches_generate_on_gpu(tokenizer,
                                                                       group_kernel_wins,
                                                                       monkeypatch):
    """Sibling projections sharing one shrink, replayed in CUDA graphs, generate what the
    unshared model does eagerly: through the shared chain, and through the group kernel
    where a measured group table (stubbed here) has it win."""
    dispatch.group_choices.clear()
    monkeypatch.setattr(tables, "group_kernel_wins",
                        lambda *args: group_kernel_wins)
    model = tiny_causal_lm("llama", len(tokenizer)).cuda()
    ck.compress(model, method="svd", keep=0.5)
    input_ids = prompt(len(tokenizer)).cuda()
    expected = hf_greedy(model, input_ids)
    assert share_input_shrinks(prepare_for_inference(model)) == 2 * model.config.num_hidden_layers
    generator = StaticCacheGenerator(model, max_seq_len=32, compile=True, compile_prefill=True)
    for _ in range(3):  # warm-up, recording, then replay of the recorded graphs
        assert torch.equal(generator.generate(input_ids, NEW_TOKENS, eos_token_ids=[0]),
                           expected)
