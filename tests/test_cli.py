"""`curkernels info` and `curkernels compress` as a user runs them."""

import json
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
