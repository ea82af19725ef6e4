import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

from curkernels.compress.calibration import collect_linear_stats, first_order_importance
from curkernels.compress.calibration_sources import (
    as_batches,
    calibration_texts,
    default_calibration_texts,
    split_sentences,
)
from curkernels.compress.targets import block_linears


def test_pad_tokens_do_not_count(tiny_bert):
    """Stats of a padded batch equal those of the same sequences without the pads."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 90, (1, 10), generator=g)
    padded = {"input_ids": torch.cat([ids, torch.zeros(1, 4, dtype=torch.int64)], 1),
              "attention_mask": torch.cat([torch.ones(1, 10), torch.zeros(1, 4)], 1).long()}
    plain = {"input_ids": ids, "attention_mask": torch.ones(1, 10, dtype=torch.int64)}
    targets = {"q": tiny_bert.encoder.layer[0].attention.self.query}
    a = collect_linear_stats(tiny_bert, targets, [padded], gram=True, outputs=True)["q"]
    b = collect_linear_stats(tiny_bert, targets, [plain], gram=True, outputs=True)["q"]
    assert a.tokens == b.tokens == 10
    for field in ("sq_sum", "abs_sum", "gram", "out_sum", "out_outer"):
        torch.testing.assert_close(getattr(a, field), getattr(b, field), rtol=1e-5, atol=1e-6)


def test_stats_match_direct_computation(tiny_bert, batches):
    linear = tiny_bert.encoder.layer[1].intermediate.dense
    captured = []
    handle = linear.register_forward_hook(lambda m, a, o: captured.append((a[0], o)))
    stats = collect_linear_stats(tiny_bert, {"x": linear}, batches, gram=True,
                                 outputs=True)["x"]
    handle.remove()
    xs = torch.cat([x[b["attention_mask"].bool()] for (x, _), b in zip(captured, batches, strict=True)])
    ys = torch.cat([y[b["attention_mask"].bool()] for (_, y), b in zip(captured, batches, strict=True)])
    xs, ys = xs.double(), ys.double()
    torch.testing.assert_close(stats.mean_sq, (xs ** 2).mean(0))
    torch.testing.assert_close(stats.second_moment, xs.T @ xs / len(xs))
    torch.testing.assert_close(stats.output_covariance,
                               torch.cov(ys.T, correction=0), rtol=1e-6, atol=1e-8)
    assert stats.gram.dtype == torch.float64


def test_stop_after_gives_same_stats(tiny_bert, batches):
    linear = tiny_bert.encoder.layer[0].attention.self.key
    a = collect_linear_stats(tiny_bert, {"k": linear}, batches, stop_after=True)["k"]
    b = collect_linear_stats(tiny_bert, {"k": linear}, batches)["k"]
    torch.testing.assert_close(a.sq_sum, b.sq_sum)


def test_nan_statistics_raise(tiny_bert, batches):
    linear = tiny_bert.encoder.layer[0].attention.self.query
    with torch.no_grad():
        tiny_bert.embeddings.word_embeddings.weight[5] = float("nan")
    batches[0]["input_ids"][0, 0] = 5
    with pytest.raises(ValueError, match="NaN or Inf"):
        collect_linear_stats(tiny_bert, {"q": linear}, batches)


def test_unreached_target_raises(tiny_bert):
    with pytest.raises(ValueError, match="no tokens"):
        collect_linear_stats(tiny_bert, {"q": tiny_bert.encoder.layer[0].attention.self.query},
                             [])


@pytest.mark.parametrize("fixture", ["tiny_bert", "tiny_llama"])
def test_first_order_importance_nonzero(fixture, batches, request):
    model = request.getfixturevalue(fixture)
    targets = dict(list(block_linears(model).items())[:2])
    scores = first_order_importance(model, targets, batches)
    for name, linear in targets.items():
        assert scores[name].shape == linear.weight.shape
        assert scores[name].sum() > 0 and torch.isfinite(scores[name]).all()
    assert not any(p.requires_grad is False for p in model.parameters())  # flags restored


def test_offline_default_texts_are_prose():
    texts = default_calibration_texts(64)
    assert len(texts) == 64 and all(len(t.split()) >= 12 for t in texts)
    assert calibration_texts(None, 5) == texts[:5]
    assert len(set(default_calibration_texts(10_000))) == len(default_calibration_texts(10_000))


def word_tokenizer(chat_template=None):
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel({"<unk>": 0}, unk_token="<unk>")),
        unk_token="<unk>")
    tokenizer.chat_template = chat_template
    return tokenizer


def test_default_texts_for_a_chat_model_hold_chat_exchanges_of_the_same_paragraphs():
    template = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    prose = default_calibration_texts(8)
    texts = default_calibration_texts(8, tokenizer=word_tokenizer(template))
    assert texts[0::2] == prose[0::2]
    for text, paragraph in zip(texts[1::2], prose[1::2], strict=True):
        assert text.startswith("<|user|>What does ") or text.startswith("<|user|>Tell me more")
        assert text.endswith(f"<|assistant|>{paragraph}\n")
    assert calibration_texts(None, 8, tokenizer=word_tokenizer(template)) == texts
    # prose alone without a chat template, and for sentence calibration
    assert default_calibration_texts(8, tokenizer=word_tokenizer()) == prose
    assert calibration_texts(None, 8, unit="sentence", tokenizer=word_tokenizer(template)) == \
        calibration_texts(None, 8, unit="sentence")


def test_text_file_source(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text("first line here\n\n  second line  \nthird\n")
    assert calibration_texts(str(path), 2) == ["first line here", "second line"]


class _Tokenizer:
    pad_token = "<pad>"

    def __call__(self, texts, **_):
        length = max(len(t.split()) for t in texts)
        ids = torch.zeros(len(texts), length, dtype=torch.int64)
        mask = torch.zeros_like(ids)
        for i, t in enumerate(texts):
            ids[i, :len(t.split())] = 7
            mask[i, :len(t.split())] = 1
        return {"input_ids": ids, "attention_mask": mask}


def test_strings_become_batches():
    batches = as_batches(["a b c", "d e", "f"], _Tokenizer(), batch_size=2)
    assert len(batches) == 2 and batches[0]["input_ids"].shape == (2, 3)
    assert batches[1]["attention_mask"].tolist() == [[1]]


def test_strings_without_tokenizer_raise():
    with pytest.raises(ValueError, match="tokenizer"):
        as_batches(["a b c"])


@pytest.mark.parametrize("bad", [[], [{"attention_mask": 1}], 3, [1, 2]])
def test_bad_calib_raises(bad):
    with pytest.raises((TypeError, ValueError), match="calib"):
        as_batches(bad)


def test_missing_calibration_file_is_not_taken_for_a_dataset(tmp_path):
    with pytest.raises(FileNotFoundError, match="calibration file"):
        calibration_texts(str(tmp_path / "missing.txt"), 4)


def test_sentences_are_split_where_the_next_word_starts_a_sentence():
    texts = ["It is related to the American lobster, H. americanus. It may grow quite large! "
             "\"Cutters\" hold the prey. Short one.", "  A heading  ",
             "Is this the one? yes, it is this one."]
    assert split_sentences(texts) == [
        "It is related to the American lobster, H. americanus.", "It may grow quite large!",
        "\"Cutters\" hold the prey.", "Is this the one? yes, it is this one."]


def test_sentence_unit_counts_sentences_and_reads_on_for_them(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text("The title\n" + "\n".join(
        f"Paragraph {i} opens here today. Paragraph {i} goes on here. Paragraph {i} ends here."
        for i in range(4)))
    sentences = calibration_texts(str(path), 7, unit="sentence")
    assert len(sentences) == 7  # of 12, from the first 3 paragraphs
    assert sentences[0] == "Paragraph 0 opens here today." and sentences[6].startswith(
        "Paragraph 2 opens")
    assert len(calibration_texts(str(path), 50, unit="sentence")) == 12  # all there is
    headed = [t for i in range(6) for t in (f"Heading {i}", f"Sentence {i} stands alone.")]
    assert calibration_texts(headed, 3, unit="sentence") == [
        f"Sentence {i} stands alone." for i in range(3)]  # 3 texts held 1: it read on
    defaults = calibration_texts(None, 20, unit="sentence")
    assert len(defaults) == 20 and all(len(s.split()) >= 4 for s in defaults)


def test_bad_unit_and_sentenceless_source_raise(tmp_path):
    with pytest.raises(ValueError, match="unit must be one of"):
        calibration_texts(["A whole text here."], 2, unit="paragraph")
    with pytest.raises(ValueError, match="no sentence"):
        calibration_texts(["too short", "A heading"], 2, unit="sentence")
