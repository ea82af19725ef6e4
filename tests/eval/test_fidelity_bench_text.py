"""bench/compress_fidelity.py's text preparation: WikiText lines as plain sentences."""

import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "compress_fidelity.py"


def _fidelity_bench():
    spec = importlib.util.spec_from_file_location("compress_fidelity", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_wikitext_lines_become_plain_sentences():
    lines = [" = = Description = = ",
             "Homarus gammarus , known as the European lobster , is a <unk> species . It is "
             "closely related to the American lobster , H. americanus . It may grow to 0 @.@ 7 "
             "m ( 24 in ) .",
             "The claw 's edge is sharp @-@ toothed , and \" cutter \" is its name . Short one ."]
    sentences = _fidelity_bench().wikitext_sentences(lines)
    assert sentences == [
        "Homarus gammarus, known as the European lobster, is a [UNK] species.",
        "It is closely related to the American lobster, H. americanus.",
        "It may grow to 0.7 m (24 in).",
        "The claw's edge is sharp-toothed, and \"cutter\" is its name.",
    ]
