"""Incremental detokenization never sends half a character; stop strings cut streamed text
exactly where the whole text would be cut."""

import pytest

from curkernels.serve import IncrementalDetokenizer, StopMatcher

TEXT = "héllo wörld, ça va? 日本語 fox"


def test_deltas_add_up_to_the_text_without_broken_characters(tokenizer):
    ids = tokenizer(TEXT)["input_ids"]
    detokenizer = IncrementalDetokenizer(tokenizer)
    deltas = [detokenizer.push(i) for i in ids] + [detokenizer.finish()]
    assert "".join(deltas) == TEXT
    assert not any("\ufffd" in d for d in deltas)
    assert "" in deltas  # some token ended inside a multi-byte character and was held back


def test_finish_sends_an_unfinished_character(tokenizer):
    ids = tokenizer("日")["input_ids"]
    assert len(ids) > 1
    detokenizer = IncrementalDetokenizer(tokenizer)
    assert detokenizer.push(ids[0]) == ""
    assert detokenizer.finish() == "\ufffd"


@pytest.mark.parametrize("pieces", [["ab", "cSTOPde"], ["abcS", "T", "OPde"], list("abcSTOPde")])
def test_stop_string_split_across_deltas(pieces):
    matcher = StopMatcher(["STOP", "zz"])
    sent = "".join(matcher.feed(p) for p in pieces)
    assert matcher.stopped and sent == "abc"
    assert matcher.feed("more") == ""


def test_no_stop_string_sends_everything():
    matcher = StopMatcher(["STOP"])
    sent = "".join(matcher.feed(p) for p in ["abc", "STO", "x"]) + matcher.flush()
    assert sent == "abcSTOx" and not matcher.stopped
