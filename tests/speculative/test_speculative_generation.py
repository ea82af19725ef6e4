"""Speculative StaticCacheGenerator: greedy output is the target's own, token for token;
sampled output has the target's distribution; the draft also serves transformers' assisted
generation."""

import itertools

import pytest
import torch
from scipy.stats import chisquare
from speculative_models import LOW_RANK, calibration_batches, causal_lm

import curkernels as ck
from curkernels.serve import StaticCacheGenerator

PROMPTS, PROMPT_LEN, NEW_TOKENS = 32, 8, 64


@pytest.fixture
def fresh_dynamo():
    """A compiled test starts from an empty dynamo cache: graphs that earlier tests compiled
    (other models, backends and draft lengths) count towards the step functions' recompile
    limit, which one process of tests reaches and one generator never does."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("architecture", ["llama", "qwen2"])
def test_greedy_output_is_the_targets_own(architecture):
    model = causal_lm(architecture)
    # exact CUR layers but a 48-token head: drafts stand often, and fall whenever the target's
    # next token lies outside the head's tokens
    draft = ck.make_draft(model, keep=0.5, calib=calibration_batches(count=1),
                          max_rank=LOW_RANK, head_tokens=48)
    prompts = torch.randint(0, 96, (PROMPTS, PROMPT_LEN),
                            generator=torch.Generator().manual_seed(3))
    expected = model.generate(prompts, max_new_tokens=NEW_TOKENS, do_sample=False,
                              min_new_tokens=NEW_TOKENS, pad_token_id=None, eos_token_id=None)
    generator = StaticCacheGenerator(model, max_seq_len=PROMPT_LEN + NEW_TOKENS, draft=draft,
                                     num_draft_tokens=4)
    accepted = []
    for row in range(PROMPTS):
        out = generator.generate(prompts[row:row + 1], NEW_TOKENS)
        assert torch.equal(out[0], expected[row]), f"prompt {row} differs"
        accepted += generator.accepted_per_step
    assert 0 in accepted and 4 in accepted  # both rejections and fully accepted rounds ran
    assert len(accepted) < PROMPTS * (NEW_TOKENS - 1)  # fewer verifications than tokens


def test_greedy_output_survives_a_draft_that_is_always_wrong_and_eos():
    model = causal_lm("llama")
    draft = ck.make_draft(model, keep=0.5, head_tokens=[0])
    prompt = torch.randint(0, 96, (1, 5), generator=torch.Generator().manual_seed(4))
    expected = StaticCacheGenerator(model, max_seq_len=30).generate(prompt, 25)
    generator = StaticCacheGenerator(model, max_seq_len=30, draft=draft, num_draft_tokens=3)
    assert torch.equal(generator.generate(prompt, 25), expected)
    stop = int(expected[0, 5 + 10])
    first = int((expected[0, 5:] == stop).nonzero()[0])
    out = generator.generate(prompt, 25, eos_token_ids=[stop])
    assert torch.equal(out, expected[:, :5 + first + 1])


def exact_joint(model, prompt: torch.Tensor, length: int, temperature: float) -> torch.Tensor:
    """P(first `length` tokens) under `model` sampled at `temperature`, every sequence."""
    vocab = model.config.vocab_size
    sequences = torch.tensor(list(itertools.product(range(vocab), repeat=length)))
    ids = torch.cat([prompt.expand(len(sequences), -1), sequences], dim=1)
    with torch.no_grad():
        logits = model(ids).logits[:, prompt.shape[1] - 1:-1] / temperature
    logp = torch.log_softmax(logits.double(), -1).gather(-1, sequences[..., None])[..., 0]
    return logp.sum(-1).exp()


def sample_counts(generator, prompt, samples: int, length: int, vocab: int, seed: int,
                  accepted: list[int] | None = None):
    counts = torch.zeros(vocab ** length)
    for i in range(samples):
        tokens = generator.generate(prompt, length + 1, temperature=0.8, seed=seed + i)
        if accepted is not None:
            accepted += generator.accepted_per_step
        index = 0
        for t in tokens[0, prompt.shape[1]:prompt.shape[1] + length].tolist():
            index = index * vocab + t
        counts[index] += 1
    return counts


def chi_square_p(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's test, bins with expected count < 5 pooled into one."""
    expected = probs * counts.sum()
    small = expected < 5
    observed = torch.cat([counts[~small], counts[small].sum()[None]])
    expected = torch.cat([expected[~small], expected[small].sum()[None]])
    return float(chisquare(observed.numpy(), expected.numpy() * observed.sum().item()
                           / expected.sum().item()).pvalue)


def test_sampled_tokens_follow_the_targets_distribution():
    vocab, length, samples = 5, 3, 600
    model = causal_lm("llama", vocab_size=vocab, initializer_range=0.3, block_rank=None)
    draft = ck.make_draft(model, keep=0.3)  # far from the target: many rejections
    prompt = torch.tensor([[1, 4, 2]])
    target = exact_joint(model, prompt, length, 0.8)
    speculative = StaticCacheGenerator(model, max_seq_len=8, draft=draft, num_draft_tokens=3)
    accepted = []
    counts = sample_counts(speculative, prompt, samples, length, vocab, seed=0,
                           accepted=accepted)
    assert chi_square_p(counts, target) > 1e-3
    assert set(accepted) == {0, 1, 2}  # k = 2 here: rejections at each place, and none
    # the test has power: the draft's own samples are told apart from the target's
    draft_alone = StaticCacheGenerator(draft, max_seq_len=8)
    assert chi_square_p(sample_counts(draft_alone, prompt, samples, length, vocab, seed=0),
                        target) < 1e-3


@pytest.mark.parametrize("method", ["curing", "pairwise"])
def test_the_draft_serves_transformers_assisted_generation(method):
    model = causal_lm("qwen2", block_rank=LOW_RANK if method == "curing" else None)
    options = {"max_rank": LOW_RANK} if method == "curing" else {}
    draft = ck.make_draft(model, method, keep=0.5, calib=calibration_batches(count=1), **options)
    prompt = torch.randint(0, 96, (1, 6), generator=torch.Generator().manual_seed(5))
    expected = model.generate(prompt, max_new_tokens=24, do_sample=False, eos_token_id=None)
    assisted = model.generate(prompt, max_new_tokens=24, do_sample=False, eos_token_id=None,
                              assistant_model=draft)
    assert torch.equal(assisted, expected)


def test_speculative_options_are_checked():
    model = causal_lm("llama")
    draft = ck.make_draft(model, keep=0.5)
    with pytest.raises(ValueError, match="needs batch_size 1"):
        StaticCacheGenerator(model, max_seq_len=16, batch_size=2, draft=draft)
    with pytest.raises(ValueError, match="num_draft_tokens must be a positive integer"):
        StaticCacheGenerator(model, max_seq_len=16, draft=draft, num_draft_tokens=0)
    other = causal_lm("llama", vocab_size=50)
    with pytest.raises(ValueError, match="vocabulary of 50 tokens"):
        StaticCacheGenerator(model, max_seq_len=16, draft=other)


@pytest.mark.slow
@pytest.mark.usefixtures("fresh_dynamo")
@pytest.mark.parametrize("architecture", ["llama", "qwen2"])
def test_inductor_compiled_greedy_output_is_the_targets_own(architecture):
    """32 prompts x 64 tokens through inductor-compiled draft steps and verifications: the
    compiled rounds (every draft length k the end of a generation leaves) emit the dense
    model's greedy tokens."""
    model = causal_lm(architecture)
    draft = ck.make_draft(model, keep=0.5, calib=calibration_batches(count=1),
                          max_rank=LOW_RANK, head_tokens=48)
    prompts = torch.randint(0, 96, (PROMPTS, PROMPT_LEN),
                            generator=torch.Generator().manual_seed(6))
    dense = StaticCacheGenerator(model, max_seq_len=PROMPT_LEN + NEW_TOKENS)
    generator = StaticCacheGenerator(model, max_seq_len=PROMPT_LEN + NEW_TOKENS, draft=draft,
                                     num_draft_tokens=4, compile=True)
    accepted = []
    for row in range(PROMPTS):
        prompt = prompts[row:row + 1]
        expected = dense.generate(prompt, NEW_TOKENS)
        assert torch.equal(generator.generate(prompt, NEW_TOKENS), expected), f"prompt {row}"
        accepted += generator.accepted_per_step
    assert 0 in accepted and 4 in accepted


@pytest.mark.slow
@pytest.mark.usefixtures("fresh_dynamo")
def test_compiled_steps_give_the_same_greedy_output():
    """fullgraph capture of the draft step and the verification (the eager backend keeps
    the test to graph capture; inductor adds only code generation)."""
    model = causal_lm("llama")
    draft = ck.make_draft(model, keep=0.5, calib=calibration_batches(count=1),
                          max_rank=LOW_RANK, head_tokens=48)
    prompt = torch.randint(0, 96, (1, 8), generator=torch.Generator().manual_seed(3))
    expected = StaticCacheGenerator(model, max_seq_len=40).generate(prompt, 32)
    generator = StaticCacheGenerator(model, max_seq_len=40, draft=draft, num_draft_tokens=3,
                                     compile=True, compile_backend="eager")
    assert torch.equal(generator.generate(prompt, 32), expected)
    assert 0 in generator.accepted_per_step and 3 in generator.accepted_per_step


def pairwise_draft(model):
    """The compression default's structure at a high keep: it agrees with the target often."""
    return ck.make_draft(model, "pairwise", keep=0.9, calib=calibration_batches(count=2),
                         head_tokens=64)


@pytest.mark.parametrize("architecture", ["llama", "qwen2"])
def test_greedy_output_with_a_pairwise_draft_is_the_targets_own(architecture):
    model = causal_lm(architecture, block_rank=None)
    draft = pairwise_draft(model)
    prompts = torch.randint(0, 96, (PROMPTS, PROMPT_LEN),
                            generator=torch.Generator().manual_seed(8))
    dense = StaticCacheGenerator(model, max_seq_len=PROMPT_LEN + NEW_TOKENS)
    generator = StaticCacheGenerator(model, max_seq_len=PROMPT_LEN + NEW_TOKENS, draft=draft,
                                     num_draft_tokens=3)
    accepted = []
    for row in range(PROMPTS):
        prompt = prompts[row:row + 1]
        assert torch.equal(generator.generate(prompt, NEW_TOKENS),
                           dense.generate(prompt, NEW_TOKENS)), f"prompt {row} differs"
        accepted += generator.accepted_per_step
    assert 0 in accepted and 3 in accepted


@pytest.mark.slow
@pytest.mark.usefixtures("fresh_dynamo")
def test_compiled_steps_with_a_pairwise_draft_give_the_same_greedy_output():
    """fullgraph capture of a draft whose layers gather the target's rows and scatter q/k/v
    back to the head width."""
    model = causal_lm("qwen2", block_rank=None)
    draft = pairwise_draft(model)
    prompt = torch.randint(0, 96, (1, 8), generator=torch.Generator().manual_seed(3))
    expected = StaticCacheGenerator(model, max_seq_len=40).generate(prompt, 32)
    generator = StaticCacheGenerator(model, max_seq_len=40, draft=draft, num_draft_tokens=3,
                                     compile=True, compile_backend="eager")
    assert torch.equal(generator.generate(prompt, 32), expected)
    assert sum(generator.accepted_per_step) > 0
