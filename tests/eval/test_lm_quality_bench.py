"""bench/lm_quality.py end to end on a tiny GGUF Llama: the split rule, the tables, merging."""

import copy
import json
import random

import pytest
import torch
from bench_scripts import load_bench_script
from tiny_gguf import tiny_llama, write_gguf

from curkernels.checkpoint import load_model
from curkernels.eval import score_next_tokens

WORDS = ("the", "cat", "sat", "on", "mat", "dog", "ran", "far", "away", "then", "slept")


@pytest.fixture(scope="module")
def bench():
    return load_bench_script("lm_quality")


@pytest.fixture
def data(tmp_path):
    """WikiText-like lines: headings, blank lines, long and short paragraphs, all distinct."""
    rng = random.Random(0)
    lines = []
    for i in range(40):
        lines += [f" = Section {i} = \n", " \n"]
        words = 35 if i % 3 else 12
        lines.append(" " + " ".join(rng.choice(WORDS) for _ in range(words)) + f" {i} . \n")
    path = tmp_path / "valid.txt"
    path.write_text("".join(lines))
    return path


@pytest.fixture
def gguf_model(tmp_path, monkeypatch):
    monkeypatch.setenv("CURKERNELS_CACHE_DIR", str(tmp_path / "cache"))
    return write_gguf(tiny_llama(layers=4), tmp_path / "tiny.gguf")


def test_calibration_and_evaluation_never_share_a_line(bench, data, gguf_model):
    _, tokenizer = load_model(str(gguf_model))
    lines = data.read_text().splitlines(keepends=True)
    ids, calib, cut = bench.split_lines(lines, tokenizer, eval_tokens=300, calib_samples=5)
    assert ids.numel() == 300
    evaluation = {line.strip() for line in lines[:cut]}
    assert not evaluation & set(calib)
    # the shortest run of first lines that holds the tokens: one line fewer would not
    assert len(tokenizer("".join(lines[:cut - 1]))["input_ids"]) < 300
    assert all(len(text.split()) > 30 and not text.startswith("=") for text in calib)
    assert calib == [line.strip() for line in lines[cut:] if len(line.split()) > 30][:5]
    with pytest.raises(ValueError, match="calib-samples"):
        bench.split_lines(lines, tokenizer, eval_tokens=300, calib_samples=1000)


def test_healing_text_is_packed_and_its_validation_sequences_never_trained(bench, data,
                                                                          gguf_model):
    _, tokenizer = load_model(str(gguf_model))
    texts = bench.paragraphs(data.read_text().splitlines(keepends=True))
    batches, validation = bench.healing_batches(texts, tokenizer, seq_len=16, batch_size=3,
                                                validation_sequences=2)
    stream = tokenizer("\n".join(texts), return_tensors="pt")["input_ids"][0]
    whole = stream.numel() // 16
    assert validation["input_ids"].shape == (2, 16)
    assert torch.equal(validation["input_ids"].flatten(),
                       stream[(whole - 2) * 16: whole * 16])
    trained = torch.cat([b["input_ids"] for b in batches]).flatten()
    assert all(b["input_ids"].shape == (3, 16) and b["attention_mask"].all() for b in batches)
    assert torch.equal(trained, stream[: trained.numel()])
    assert trained.numel() <= (whole - 2) * 16 < trained.numel() + 3 * 16
    with pytest.raises(ValueError, match="heal-validation"):
        bench.healing_batches(texts, tokenizer, seq_len=16, batch_size=3,
                              validation_sequences=whole)


def test_parse_ablation(bench):
    assert bench.parse_ablation("svdllm:allocation=global,damping=0.01") == (
        "svdllm", {"allocation": "global", "damping": 0.01})
    assert bench.parse_ablation("rom") == ("rom", {})
    with pytest.raises(ValueError, match="method must be one of"):
        bench.parse_ablation("nope:x=1")
    with pytest.raises(ValueError, match="OPT=VAL"):
        bench.parse_ablation("svd:flag")


def test_a_run_writes_json_markdown_and_plot_and_later_runs_merge(bench, data, gguf_model,
                                                                  tmp_path):
    common = ["--model", str(gguf_model), "--data", str(data), "--eval-tokens", "256",
              "--window", "64", "--calib-samples", "4", "--calib-tokens", "32", "--threads", "1",
              "--out", str(tmp_path / "results")]
    results = bench.main([*common, "--methods", "dense,svd,curing-own", "--keeps", "0.5",
                          "--heal", "3", "--heal-batch", "2", "--heal-seq", "16",
                          "--heal-validation", "1", "--heal-check", "2",
                          "--ablation", "svdllm:allocation=global", "--ablation-keeps", "0.6"])
    dense = results["dense"]
    model, tokenizer = load_model(str(gguf_model))
    lines = data.read_text().splitlines(keepends=True)
    ids, _, _ = bench.split_lines(lines, tokenizer, eval_tokens=256, calib_samples=4)
    assert dense["perplexity"] == pytest.approx(
        score_next_tokens(model, ids, window=64, stride=64).perplexity)
    assert dense["scored_tokens"] == 4 * 63
    svd, own = results["runs"]["svd@0.5"], results["runs"]["curing-own@0.5"]
    assert svd["method"] == "svd" and svd["modules"] == 4 * 7
    assert own["method"] == "curing" and own["modules"] < svd["modules"]
    assert 0 <= svd["agreement"] <= 1 and svd["ratio"] == pytest.approx(
        svd["perplexity"] / dense["perplexity"])
    assert svd["block_kept"] < 1 and svd["compress_seconds"] > 0 and svd["threads"] == 1
    healed = svd["healed"]
    assert healed["steps"] == 3 and healed["tokens"] == 3 * 2 * 16 and healed["perplexity"] > 1
    # validation KL checked at steps 0 and 2 and after the last; the kept step is the lowest
    assert [step for step, _ in healed["validation_kl"]] == [0, 2, 3]
    assert healed["kept_step"] == min(healed["validation_kl"], key=lambda c: c[1])[0]
    # what healing trained (svd's A and B): fewer parameters than the decoder blocks hold
    assert 0 < healed["trainable_parameters"] < dense["block_parameters"]
    assert list(results["ablation"]) == ["svdllm,allocation=global@0.6"]
    out = tmp_path / "results"
    markdown = (out / "lm_quality.md").read_text()
    assert results["protocol"]["split"] in markdown and "| svd |" in markdown and "(1 thr)" in markdown
    assert "curing-own (curing)" in markdown and "## Ablation" in markdown
    assert (out / "lm_quality.png").stat().st_size > 0
    # a later run of another method adds to the table; dense is not measured again
    merged = bench.main([*common, "--methods", "svd", "--keeps", "0.6"])
    assert set(merged["runs"]) == {"svd@0.5", "curing-own@0.5", "svd@0.6"}
    assert merged["dense"] == dense
    assert json.loads((out / "lm_quality.json").read_text())["runs"].keys() == \
        merged["runs"].keys()
    # a run that loaded the table before another one wrote keeps the other's rows
    stale = copy.deepcopy(results)
    stale["runs"]["svd@0.9"] = merged["runs"]["svd@0.6"]
    bench.write(stale, out, "lm_quality", "runs", "svd@0.9")
    saved = json.loads((out / "lm_quality.json").read_text())
    assert set(saved["runs"]) == {"svd@0.5", "curing-own@0.5", "svd@0.6", "svd@0.9"}
    bench.write(stale, out, "lm_quality")  # the dense scores alone, as a run starts
    assert json.loads((out / "lm_quality.json").read_text()) == saved
    assert not list(out.glob(".*partial"))
    # a run under another protocol does not replace the table
    with pytest.raises(SystemExit, match="another protocol.*eval_tokens"):
        bench.main([*common[:4], "--eval-tokens", "192", *common[6:], "--methods", "svd",
                    "--keeps", "0.6"])
    assert json.loads((out / "lm_quality.json").read_text()) == saved
