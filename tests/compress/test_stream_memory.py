"""What keeps streaming's memory at one block: tensors outside the blocks copied a block of
rows at a time, only the calibration's embedding rows read, each block's dense Linears freed
once it is compressed, and the shards' one-tensor files as safetensors reads them."""

import pytest
import torch
from conftest import random_batches
from safetensors.torch import load_file
from stream_models import save_sharded

import curkernels as ck
from curkernels.compress import block_steps, streaming
from curkernels.compress.shard_reader import ShardReader
from curkernels.compress.tensor_file import write_tensor_file


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.int64])
def test_a_tensor_written_in_blocks_reads_back(tmp_path, dtype):
    tensor = (torch.randn(7, 3, 2) * 100).to(dtype)
    write_tensor_file(tmp_path / "t.safetensors", "w", dtype, (7, 3, 2),
                      [tensor[:3], tensor[3:4], tensor[4:]])
    assert torch.equal(load_file(tmp_path / "t.safetensors")["w"], tensor)


def test_blocks_are_cast_and_checked(tmp_path):
    tensor = torch.randn(4, 3)
    write_tensor_file(tmp_path / "t.safetensors", "w", torch.bfloat16, (4, 3), [tensor])
    assert torch.equal(load_file(tmp_path / "t.safetensors")["w"], tensor.to(torch.bfloat16))
    with pytest.raises(ValueError, match="held 24 bytes"):
        write_tensor_file(tmp_path / "u.safetensors", "w", torch.float32, (4, 3), [tensor[:2]])
    with pytest.raises(ValueError, match="rows of"):
        write_tensor_file(tmp_path / "v.safetensors", "w", torch.float32, (4, 3),
                          [torch.zeros(4, 2)])


def test_reader_gives_rows_and_row_blocks(tmp_path):
    source = save_sharded(tmp_path / "dense")
    reader = ShardReader(source)
    name = "model.embed_tokens.weight"
    whole = reader.tensors([name])[name]
    ids = torch.tensor([0, 1, 2, 7, 40, 41, 95])
    assert torch.equal(reader.rows(name, ids), whole[ids])
    blocks = list(reader.row_blocks(name, block_bytes=10 * whole[0].nbytes))
    assert len(blocks) == 10 and torch.equal(torch.cat(blocks), whole)
    assert reader.shape_and_dtype(name) == (tuple(whole.shape), whole.dtype)


def test_no_tensor_outside_the_blocks_is_read_whole(tmp_path, monkeypatch):
    """The embedding and the LM head (a 128k vocabulary makes each 0.5 GB in bf16) are copied
    through in row blocks and only the calibration's rows of the embedding are read; the
    result is what the in-memory path writes (test_streaming)."""
    source = save_sharded(tmp_path / "dense", tie_word_embeddings=False)
    whole_reads = []
    original = ShardReader.tensors

    def recording(self, names):
        names = list(names)
        whole_reads.extend(names)
        return original(self, names)

    monkeypatch.setattr(ShardReader, "tensors", recording)
    ck.compress_streaming(source, tmp_path / "out", "svdllm", keep=0.5, calib=random_batches(),
                          progress=False)
    assert whole_reads and all(".layers." in name for name in whole_reads), whole_reads


def test_the_api_leaves_the_callers_allocator_alone(tmp_path, monkeypatch):
    """glibc's mmap threshold, once set, holds for the whole process: only the streaming CLI
    (a process of its own) sets it."""
    calls = []
    monkeypatch.setattr(streaming, "return_freed_memory", lambda: calls.append(1))
    ck.compress_streaming(save_sharded(tmp_path / "dense"), tmp_path / "out", "svd", keep=0.5,
                          progress=False)
    assert not calls


def test_each_blocks_dense_linears_are_freed_once_it_is_compressed(tmp_path, monkeypatch):
    source = save_sharded(tmp_path / "dense")
    replaced = {}
    original = block_steps.compress_block

    def recording(model, config, keep, prefix, index, block, targets, *rest):
        replaced[index] = list(targets.values())
        return original(model, config, keep, prefix, index, block, targets, *rest)

    monkeypatch.setattr(streaming, "compress_block", recording)
    still_real = {}

    def after_block(index):
        still_real[index] = [linear for linear in replaced[index] if not linear.weight.is_meta]

    ck.compress_streaming(source, tmp_path / "out", "svdllm", keep=0.5, calib=random_batches(),
                          progress=False, on_block_done=after_block)
    assert sorted(still_real) == [0, 1, 2, 3]
    assert not any(still_real.values())


def test_statistics_are_summed_a_chunk_of_tokens_at_a_time(monkeypatch, tiny_llama):
    """Sums over a few tokens at a time (no fp64 copy of a wide batch) and a Gram matrix kept
    in fp32 when asked: the same statistics as the whole batch's fp64 sums, to rounding."""
    from curkernels.compress import calibration
    linear = tiny_llama.model.layers[0].mlp.down_proj
    inputs = []
    handle = linear.register_forward_hook(lambda m, args, out: inputs.append(args[0]))
    batches = random_batches()
    for batch in batches:
        tiny_llama(**batch)
    handle.remove()
    x = torch.cat([args[mask.bool()] for args, mask in zip(
        inputs, (b["attention_mask"] for b in batches), strict=True)]).double()
    monkeypatch.setattr(calibration, "CHUNK_VALUES", 3 * linear.in_features)  # 3 tokens
    stats = calibration.collect_linear_stats(tiny_llama, {"down": linear}, batches, gram=True,
                                             gram_dtype=torch.float32)["down"]
    assert stats.tokens == x.shape[0] and stats.gram.dtype == torch.float32
    torch.testing.assert_close(stats.in_sum, x.sum(0))
    torch.testing.assert_close(stats.sq_sum, (x * x).sum(0))
    torch.testing.assert_close(stats.gram.double(), x.T @ x, rtol=1e-5, atol=1e-5)
    assert calibration.all_finite(stats.gram)
    stats.gram[2, 3] = float("nan")
    assert not calibration.all_finite(stats.gram)
