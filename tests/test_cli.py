"""`curkernels info` and `curkernels compress` as a user runs them."""

import json
import os
import subprocess
import sys

from model_configs import tiny_model

from curkernels.checkpoint import read_compression_config


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "curkernels", *args], capture_output=True,
                          text=True, timeout=600)


def test_info_reports_versions_extension_and_backends():
    result = run_cli("info", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["torch"] and report["transformers"]
    assert set(report["backends"]) == {"torch", "triton", "cuda"}
    assert report["backends"]["torch"] == "live"
    if not report["extension_built"]:
        assert "unavailable" in report["backends"]["cuda"]
    # the package ships its measured decode tables and tile configs (package data)
    assert {"NVIDIA H100 80GB HBM3", "NVIDIA H200"} <= set(report["decode_tables"])
    assert "NVIDIA H100 80GB HBM3" in report["decode_configs"]
    from curkernels.ops.triton.launch import SUPPORTED
    assert report["triton_features"].startswith(
        f"cached decode launches: {'yes' if SUPPORTED else 'no'}")
    assert set(report["graph_decode"]) == set(report["gpus"])


def test_info_names_the_gpus_a_group_table_answers_for(tmp_path):
    """No GPU has a shipped group table yet; CURKERNELS_GROUP_TABLE adds its run's device."""
    table = tmp_path / "group_bench.json"
    table.write_text(json.dumps({"meta": {"device": "Some GPU", "dtype": "bfloat16"},
                                 "results": []}))
    result = subprocess.run([sys.executable, "-m", "curkernels", "info", "--json"],
                            capture_output=True, text=True, timeout=600,
                            env={**os.environ, "CURKERNELS_GROUP_TABLE": str(table)})
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["group_tables"] == ["Some GPU"]


def test_compress_command_writes_a_loadable_checkpoint(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path / "dense")
    result = run_cli("compress", str(tmp_path / "dense"), str(tmp_path / "out"),
                     "--method", "svd", "--keep", "0.4", "--target", "mlp.*")
    assert result.returncode == 0, result.stderr
    block = read_compression_config(tmp_path / "out")
    assert block["method"] == "svd"
    assert sorted(block["modules"]) == sorted(
        f"model.layers.{i}.mlp.{p}" for i in range(2) for p in ("gate_proj", "up_proj",
                                                                 "down_proj"))


def test_compress_command_rejects_a_bad_keep(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path / "dense")
    result = run_cli("compress", str(tmp_path / "dense"), str(tmp_path / "out"), "--keep", "1.5")
    assert result.returncode != 0
    assert "keep" in result.stderr
    assert not (tmp_path / "out").exists()


def test_compress_command_takes_a_rom_preset(tmp_path):
    """A preset sets keep and the blocks (here on a 2-block model: 3/4 of 2 rounds to both);
    an unknown preset, or one given with --keep, is refused before anything is written."""
    tiny_model("llama").save_pretrained(tmp_path / "dense")
    result = run_cli("compress", str(tmp_path / "dense"), str(tmp_path / "out"),
                     "--method", "svd", "--preset", "50%", "--target", "q_proj")
    assert result.returncode == 0, result.stderr
    block = read_compression_config(tmp_path / "out")
    assert sorted(block["modules"]) == [f"model.layers.{i}.self_attn.q_proj" for i in range(2)]
    for name, wrong in (("bad", ("--preset", "70%")), ("both", ("--preset", "50%", "--keep", "0.4"))):
        result = run_cli("compress", str(tmp_path / "dense"), str(tmp_path / name),
                         "--method", "svd", *wrong)
        assert result.returncode != 0 and "preset" in result.stderr
        assert not (tmp_path / name).exists()
