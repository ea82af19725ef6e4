"""Saving writes only what it owns: user folders, the input model and unasked replacements are
refused; links are followed; staging folders of killed saves are removed by the next save."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from model_configs import tiny_model
from transformers import LlamaForCausalLM

import curkernels as ck
from curkernels.checkpoint import atomic
from curkernels.checkpoint.atomic import STAGING_MARKER, atomic_directory
from curkernels.checkpoint.output_folder import foreign_entries

TESTS = Path(__file__).resolve().parents[1]
REPOSITORY = TESTS.parent


def compressed(seed: int = 0, keep: float = 0.5):
    model = tiny_model("llama", seed=seed)
    ck.compress(model, method="svd", keep=keep)
    return model


def contents(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def contents_of_save(model, folder: Path) -> dict[str, bytes]:
    ck.save_compressed(model, folder)
    return contents(folder)


def user_folder(folder: Path) -> Path:
    (folder / "sub").mkdir(parents=True)
    (folder / "notes.txt").write_text("my notes")
    (folder / "sub" / "data.csv").write_text("a,b\n1,2\n")
    return folder


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "curkernels", *args], capture_output=True,
                          text=True, timeout=600)


def test_a_folder_that_is_not_a_checkpoint_is_refused_and_left_intact(tmp_path):
    out = user_folder(tmp_path / "mine")
    before = contents(out)
    for overwrite in (False, True):
        with pytest.raises(ValueError, match=r"out .*mine.* not a curkernels checkpoint "
                                             r"\(it holds notes.txt, sub/\)"):
            ck.save_compressed(compressed(), out, overwrite=overwrite)
    tiny_model("llama").save_pretrained(tmp_path / "dense")
    with pytest.raises(ValueError, match="dense.* not a curkernels checkpoint"):
        ck.save_compressed(compressed(), tmp_path / "dense", overwrite=True)
    assert contents(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense", "mine"]
    (tmp_path / "empty").mkdir()  # an empty folder holds nothing to lose
    ck.save_compressed(compressed(), tmp_path / "empty")
    ck.load_compressed(tmp_path / "empty")


def test_replacing_a_checkpoint_needs_overwrite(tmp_path, monkeypatch):
    out = tmp_path / "ckpt"
    ck.save_compressed(compressed(seed=0), out)
    before = contents(out)
    with pytest.raises(ValueError, match=r"already holds a curkernels checkpoint: pass "
                                         r"overwrite=True \(--overwrite"):
        ck.save_compressed(compressed(seed=1), out)
    assert contents(out) == before
    ck.save_compressed(compressed(seed=1, keep=0.25), out, overwrite=True)
    assert contents(out) != before
    assert ck.load_compressed(out).model.layers[0].mlp.up_proj.rank == \
        compressed(seed=1, keep=0.25).model.layers[0].mlp.up_proj.rank
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)  # no renameat2: move aside
    model = compressed(seed=2)
    ck.save_compressed(model, out, overwrite=True)
    assert contents(out) == contents_of_save(model, tmp_path / "reference")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "reference"]


def test_a_checkpoint_holding_a_users_files_is_not_replaced_even_with_overwrite(tmp_path):
    out = tmp_path / "ckpt"
    ck.save_compressed(compressed(), out)
    (out / "notes.txt").write_text("mine")
    (out / "runs").mkdir()
    before = contents(out)
    with pytest.raises(ValueError, match=r"also notes.txt, runs/, which a save does not write"):
        ck.save_compressed(compressed(seed=2), out, overwrite=True)
    assert contents(out) == before and (out / "runs").is_dir()


def test_every_file_a_save_writes_is_recognised_as_its_own(tmp_path, minilm_tokenizer):
    """A checkpoint with a tokenizer can be replaced: nothing in it counts as a user's file."""
    model = tiny_model("bert")
    ck.compress(model, method="svd", keep=0.5)
    out = tmp_path / "bert"
    ck.save_compressed(model, out, tokenizer=minilm_tokenizer)
    minilm_tokenizer.chat_template = "{{ messages }}"
    ck.save_compressed(model, out, tokenizer=minilm_tokenizer, overwrite=True)
    assert (out / "chat_template.jinja").is_file()
    assert foreign_entries(out) == []
    ck.save_compressed(model, out, tokenizer=minilm_tokenizer, overwrite=True)


def test_out_equal_to_or_inside_the_input_model_folder_is_refused(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path / "dense")
    before = contents(tmp_path / "dense")
    model = LlamaForCausalLM.from_pretrained(tmp_path / "dense")
    ck.compress(model, method="svd", keep=0.5)
    (tmp_path / "link").symlink_to(tmp_path / "dense")
    for out in ("dense", "dense/compressed", "link", "link/compressed", "."):
        with pytest.raises(ValueError, match="input model folder"):
            ck.save_compressed(model, tmp_path / out, overwrite=True)
    assert contents(tmp_path / "dense") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense", "link"]


def test_cli_refuses_its_input_and_a_users_folder_before_compressing(tmp_path):
    dense = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(dense)
    before = contents(dense)
    for out in (dense, dense / "out"):
        result = run_cli("compress", str(dense), str(out), "--method", "svd", "--overwrite")
        assert result.returncode == 2, result.stderr
        assert "input model folder" in result.stderr
        assert result.stdout == ""  # refused before the compression report
    result = run_cli("compress", str(dense), str(user_folder(tmp_path / "mine")))
    assert result.returncode == 2 and "not a curkernels checkpoint" in result.stderr
    assert result.stdout == ""
    assert contents(dense) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "tiny"]


def test_cli_replaces_a_checkpoint_only_with_overwrite(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path / "dense")
    out = tmp_path / "out"
    svd = ("--method", "svd")  # no calibration: the tiny model ships no tokenizer
    first = run_cli("compress", str(tmp_path / "dense"), str(out), *svd, "--keep", "0.5")
    assert first.returncode == 0, first.stderr
    before = contents(out)
    refused = run_cli("compress", str(tmp_path / "dense"), str(out), *svd, "--keep", "0.3")
    assert refused.returncode == 2 and "--overwrite" in refused.stderr
    assert refused.stdout == "" and contents(out) == before
    replaced = run_cli("compress", str(tmp_path / "dense"), str(out), *svd, "--keep", "0.3",
                       "--overwrite")
    assert replaced.returncode == 0, replaced.stderr
    assert contents(out) != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense", "out"]


def test_a_linked_out_is_saved_through_to_its_target(tmp_path):
    real, link = tmp_path / "store" / "ckpt", tmp_path / "ckpt"
    ck.save_compressed(compressed(seed=0), real)
    link.symlink_to(real)
    with pytest.raises(ValueError, match=r"a link to .*store/ckpt.* overwrite=True"):
        ck.save_compressed(compressed(seed=1), link)
    ck.save_compressed(compressed(seed=1, keep=0.25), link, overwrite=True)
    assert link.is_symlink() and link.resolve() == real.resolve()
    assert ck.load_compressed(link).model.layers[0].mlp.up_proj.rank == \
        compressed(seed=1, keep=0.25).model.layers[0].mlp.up_proj.rank
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "store"]
    assert sorted(p.name for p in real.parent.iterdir()) == ["ckpt"]
    user_folder(tmp_path / "mine")
    (tmp_path / "to_mine").symlink_to(tmp_path / "mine")
    with pytest.raises(ValueError, match=r"to_mine.*a link to .*mine\) exists and is not a "
                                         r"curkernels checkpoint"):
        ck.save_compressed(compressed(), tmp_path / "to_mine", overwrite=True)


KILLED_SAVE = textwrap.dedent("""
    import os, signal, sys
    import curkernels as ck
    from model_configs import tiny_model

    model = tiny_model("llama", seed=3)
    ck.compress(model, method="svd", keep=0.5)
    def die(self, folder, **kwargs):
        (folder / "model.safetensors").write_bytes(b"half")
        os.kill(os.getpid(), signal.SIGKILL)
    type(model).save_pretrained = die
    ck.save_compressed(model, sys.argv[1], overwrite=True)
""")


def test_leftover_staging_folders_are_removed_by_the_next_save_but_a_live_ones_stays(tmp_path):
    out = tmp_path / "ckpt"
    ck.save_compressed(compressed(), out)
    killed = subprocess.run([sys.executable, "-c", KILLED_SAVE, str(out)],
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(
                                [str(REPOSITORY), str(TESTS)])}, capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr
    (dead,) = tmp_path.glob(".ckpt.tmp-*")
    assert (dead / STAGING_MARKER).is_file()
    # as older versions left them: checkpoint files straight inside, or under NAME/
    (tmp_path / ".ckpt.tmp-older").mkdir()
    (tmp_path / ".ckpt.tmp-older" / "model.safetensors").write_bytes(b"x")
    (tmp_path / ".ckpt.old-older" / "ckpt").mkdir(parents=True)
    (tmp_path / ".ckpt.old-older" / "ckpt" / "config.json").write_text("{}")
    (tmp_path / ".ckpt.tmp-empty").mkdir()
    # a folder named like staging but holding a user's file is not a save's
    user_folder(tmp_path / ".ckpt.tmp-mine")
    with pytest.raises(KeyboardInterrupt):
        with atomic_directory(out) as held:  # a save still running: its staging is locked
            (held / "model.safetensors").write_bytes(b"in progress")
            ck.save_compressed(compressed(seed=4), out, overwrite=True)
            assert (held / "model.safetensors").read_bytes() == b"in progress"
            assert {p.name for p in tmp_path.iterdir()} == {
                ".ckpt.tmp-mine", held.parent.name, "ckpt"}
            raise KeyboardInterrupt  # that save fails: it removes its own staging
    assert sorted(p.name for p in tmp_path.iterdir()) == [".ckpt.tmp-mine", "ckpt"]
    assert torch.equal(ck.load_compressed(out).model.layers[0].mlp.up_proj.R,
                       compressed(seed=4).model.layers[0].mlp.up_proj.R)


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_saved_files_are_readable_as_the_umask_allows(tmp_path, umask):
    """The weights get the mode config.json gets (safetensors writes 0600 files of its own),
    and so does any file written inside a staging folder (draft deltas, GGUF conversions)."""
    previous = os.umask(umask)
    try:
        assert atomic.process_umask() == umask
        ck.save_compressed(compressed(), tmp_path / "out")
        with atomic_directory(tmp_path / "other") as staging:
            path = staging / "private.bin"
            path.write_bytes(b"x")
            path.chmod(0o600)
    finally:
        os.umask(previous)
    files = [p for folder in ("out", "other") for p in (tmp_path / folder).rglob("*")
             if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in files)
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in files} == \
        {p.name: oct(0o666 & ~umask) for p in files}
