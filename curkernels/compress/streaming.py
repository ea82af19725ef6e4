"""`compress_streaming(model_folder, out, ...)`: compress a safetensors checkpoint block by
block — read one block from the shards, calibrate it on the inputs the blocks before it
produce, compress it, write it durably, free it — so memory holds one block and the
calibration activations whatever the model's size; a killed run continues where it stopped.

The result equals what `compress` + `save_compressed` write for the same method, options and
calibration: each block runs the method's own layer-local code on the same cached inputs
(the dense model's for one-shot methods; the compressed blocks' outputs, and the dense ones
beside them, for the sequential ones)."""

import base64
import ctypes
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, fields
from functools import partial
from pathlib import Path

import psutil
import torch
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm
from transformers import GenerationConfig

from ..checkpoint.module_specs import FACTORED_CLASSES, module_spec
from ..checkpoint.output_folder import check_output_folder
from ..checkpoint.surgery import apply_compression_config, finish_loading
from .api import METHODS, calibration_batches, compression_metadata, method_config, plan_compression
from .block_steps import Streams, check_block_targets, check_streamable, compress_block, streams_for
from .configs import MethodConfig
from .layer_selection import block_list
from .pairwise_budget import block_keeps, keep_floor
from .replay import capture_block_inputs, next_block_inputs
from .report import CompressionReport, ModuleReport
from .shard_reader import ShardReader
from .skeleton import checkpoint_dtype, empty_model, fill, release
from .stream_output import publish, shard_name
from .stream_progress import StreamProgress
from .stream_scores import streamed_layer_scores
from .tensor_file import write_tensor_file

logger = logging.getLogger(__name__)
GB = 1e9
M_MMAP_THRESHOLD = -3  # glibc's malloc.h


def available_memory() -> int:
    return psutil.virtual_memory().available


def resident_memory() -> int:
    return psutil.Process().memory_info().rss


def return_freed_memory() -> None:
    """Have glibc's malloc give every block of 1 MB or more back to the system when freed
    (`mallopt(M_MMAP_THRESHOLD, 1 MB)`). By default the threshold climbs to 32 MB once such a
    block is freed, and the many 1–32 MB tensors of each block's compression then fragment
    the heap, which holds its freed pages: measured on a 1B-shaped model, 0.25 GB more
    resident memory at the peak. It holds for the rest of the process (glibc cannot restore
    the dynamic threshold), so `curkernels compress --stream` calls it and
    `compress_streaming` leaves the caller's allocator as it is. A no-op where the C library
    is not glibc."""
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    mallopt(M_MMAP_THRESHOLD, 1 << 20)


def fits_in_memory(model_folder: str | os.PathLike, dtype: torch.dtype | None = None) -> bool:
    """Whether compressing the whole model in memory is expected to fit: its weights (at
    `dtype`'s size, else as stored) and half as much again for the calibration statistics,
    within the memory available now."""
    import transformers
    reader = ShardReader(model_folder)
    size = reader.total_bytes()
    if dtype is not None:
        stored = checkpoint_dtype(transformers.AutoConfig.from_pretrained(model_folder), reader)
        size = size * dtype.itemsize // stored.itemsize
    return size * 1.5 <= available_memory()


def block_memory(block: nn.Module, targets: dict[str, nn.Linear], streams: Streams,
                 batches: list[dict] | None, hidden_size: int) -> dict[str, int]:
    """Bytes one block's compression needs, roughly: its weights (twice when a dense twin is
    kept beside the compressed block), the fp64 statistics of its widest input (a Gram
    matrix, the paired cross moment, and the factorisation's work of the same size) and the
    cached calibration activations (current and next, per stream)."""
    itemsize = next(block.parameters()).element_size()
    twin = streams.dense and streams.compressed
    weights = sum(p.numel() for p in block.parameters()) * itemsize * (2 if twin else 1)
    widest = max((linear.in_features for linear in targets.values()), default=0)
    statistics = widest ** 2 * 8 * (3 if twin else 2)
    tokens = sum(batch["input_ids"].numel() for batch in batches or [])
    activations = tokens * hidden_size * itemsize * 2 * (streams.dense + streams.compressed)
    return {"weights": weights, "statistics": statistics, "activations": activations}


def _check_block_fits(need: dict[str, int], model_folder) -> None:
    total, free = sum(need.values()), available_memory()
    if total > free:
        parts = ", ".join(f"{name} {size / GB:.2f}" for name, size in need.items())
        raise ValueError(f"one block of {model_folder} needs about {total / GB:.2f} GB ({parts}), "
                         f"more than the {free / GB:.2f} GB available: use fewer calibration "
                         f"tokens (num_samples, seq_len), a smaller dtype, or more memory")


def _calibration_digest(batches: list[dict] | None) -> str | None:
    if batches is None:
        return None
    digest = hashlib.sha256()
    for batch in batches:
        for key in ("input_ids", "attention_mask"):
            value = batch.get(key)
            if isinstance(value, torch.Tensor):
                value = value.detach().cpu().contiguous()
                digest.update(f"{key}{tuple(value.shape)}{value.dtype}".encode())
                digest.update(value.numpy().tobytes())
    return digest.hexdigest()


def _fingerprint(reader: ShardReader, config: MethodConfig, dtype: torch.dtype,
                 batches) -> dict:
    """What a resumed run must share with the run it continues."""
    settings = {f.name: getattr(config, f.name) for f in fields(config)}
    return {"model": reader.fingerprint(), "method": config.method,
            "config": json.loads(json.dumps(settings, default=repr)), "dtype": str(dtype),
            "calibration": _calibration_digest(batches)}


def _check_same_attention(blocks: nn.ModuleList) -> None:
    """Every block is replayed with block 0's cached keyword inputs (mask, positions): blocks
    of another attention kind (sliding-window layers) would need their own."""
    kinds = {getattr(block, "attention_type", None) for block in blocks}
    if len(kinds) > 1:
        raise ValueError(f"the model's blocks mix attention kinds {sorted(map(str, kinds))}: "
                         f"streaming replays one mask for every block; compress in memory")


def _named_module(model: nn.Module, module: nn.Module) -> str:
    return next(name for name, m in model.named_modules() if m is module)


def compress_streaming(model_folder: str | os.PathLike, out: str | os.PathLike,
                       method: "str | MethodConfig | None" = None, keep: float | None = None,
                       calib=None, *, targets=None, exclude=(), layers=None,
                       preset: str | None = None, rank_multiple: int = 1, tokenizer=None,
                       seq_len: int = 256, batch_size: int = 16, num_samples: int | None = None,
                       dtype: torch.dtype | None = None, overwrite: bool = False,
                       resume: bool = False, progress: bool = True,
                       log: Callable[[str], None] = logger.info,
                       on_block_done: Callable[[int], None] | None = None,
                       **opts) -> CompressionReport:
    """Compress the safetensors checkpoint in `model_folder` block by block into `out` (a
    curkernels checkpoint, as `save_compressed` writes it) and return the report.

    `method`, `keep`, `calib`, ... are `compress`'s (either form: a method name with options,
    or a config). `dtype`: the dtype to compress in (default: as `from_pretrained` loads).
    `out` is checked as `save_compressed(overwrite=...)` checks it, before any work.

    Progress is kept in `.OUT.stream` beside `out`: each finished block's shard, written
    durably. A run finding a matching record there (same model files, settings and
    calibration) continues after its last finished block and says so through `log`;
    `resume=True` requires one. A record made with other settings is replaced, unless
    `resume=True` (then an error). The result is identical, tensor by tensor, to an
    uninterrupted run's. `on_block_done(index)` is called after each block is recorded.
    """
    model_folder = str(model_folder)
    target = check_output_folder(out, overwrite=overwrite, source=model_folder)
    reader = ShardReader(model_folder)
    model = empty_model(model_folder, reader, dtype)
    config = method_config(model, method, keep=keep, targets=targets, exclude=exclude,
                           layers=layers, preset=preset, rank_multiple=rank_multiple, **opts)
    check_streamable(config)
    batches = calibration_batches(model, config, calib, tokenizer=tokenizer, seq_len=seq_len,
                                  batch_size=batch_size, num_samples=num_samples)
    prefix, blocks = block_list(model)
    _check_same_attention(blocks)
    dtype = next(blocks.parameters()).dtype
    record = StreamProgress(target, _fingerprint(reader, config, dtype, batches), resume)
    try:
        run = _StreamingRun(model, reader, config, batches, prefix, blocks, record, log,
                            on_block_done)
        report, metadata, modules = run.compress(progress)
        generation = None
        if (Path(model_folder) / "generation_config.json").is_file():
            generation = GenerationConfig.from_pretrained(model_folder)
        elif model.can_generate():
            generation = model.generation_config
        publish(target, record, model, metadata, modules, report, overwrite=overwrite,
                source=model_folder, tokenizer=tokenizer, generation_config=generation)
    except BaseException:
        record.close()
        raise
    record.remove()
    return report


class _StreamingRun:
    """One pass over the blocks of `model` (an empty model): the calibration streams, the
    finished blocks skipped, each other block compressed and recorded."""

    def __init__(self, model, reader, config, batches, prefix, blocks, record, log,
                 on_block_done):
        self.model, self.reader, self.config, self.batches = model, reader, config, batches
        self.prefix, self.blocks, self.record, self.log = prefix, blocks, record, log
        self.on_block_done = on_block_done
        self.streams = streams_for(config)
        self._first_inputs = None
        self.base = self.base_names()  # before any fill: filling unties tied parameters
        self.file_count = len(self.base) + len(blocks)

    def first_inputs(self) -> list[tuple]:
        """Block 0's cached inputs: the embedding rows of the calibration's token ids read for
        one pass, then freed."""
        if self._first_inputs is None:
            embeddings = self.model.get_input_embeddings()
            self.fill_calibration_rows(embeddings)
            try:
                if next(self.model.parameters()).is_meta:
                    raise ValueError(f"{type(self.model).__name__}'s first parameter is not "
                                     f"its input embedding: streaming cannot place the "
                                     f"calibration batches")
                self._first_inputs = capture_block_inputs(self.model, self.blocks[0],
                                                          self.batches)
            finally:
                release(embeddings)
        return self._first_inputs

    def fill_calibration_rows(self, embeddings: nn.Module) -> None:
        """The input embedding with only the rows the calibration batches look up: the
        weight is allocated whole but the other rows are never written, so their pages are
        never resident (a 128k-token vocabulary's table is 0.5 GB in bf16; the calibration
        reads a few thousand rows). An embedding holding more than a weight is filled whole."""
        prefix = f"{_named_module(self.model, embeddings)}."
        empty = getattr(embeddings, "weight", None)
        if set(embeddings.state_dict()) != {"weight"} or not all(
                "input_ids" in batch for batch in self.batches):
            fill(embeddings, prefix, self.reader)
            return
        ids = torch.cat([batch["input_ids"].reshape(-1) for batch in self.batches]).unique()
        if len(ids) and not 0 <= int(ids[0]) <= int(ids[-1]) < empty.shape[0]:
            raise ValueError(f"calibration token ids span {int(ids[0])}..{int(ids[-1])}, the "
                             f"embedding has {empty.shape[0]} rows")
        rows = self.reader.rows(prefix + "weight", ids).to(empty.dtype)
        if rows.is_floating_point() and not torch.isfinite(rows).all():
            raise ValueError(f"the model's parameter {prefix}weight holds NaN or Inf: cannot "
                             f"compress a model with non-finite weights")
        weight = torch.empty(empty.shape, dtype=empty.dtype)
        weight[ids] = rows
        embeddings.weight = nn.Parameter(weight, requires_grad=False)

    def layer_scores(self, model=None, batches=None) -> torch.Tensor:
        """Every block's angular distance, from a streamed dense pass (recorded, so a resumed
        run reuses it)."""
        saved = self.record.record["extra"].get("layer_scores")
        if saved is None:
            self.log("scoring blocks by angular distance (one streamed pass of the dense model)")
            saved = streamed_layer_scores(self.model, self.reader, self.prefix, self.blocks,
                                          self.first_inputs()).tolist()
            self.record.remember("layer_scores", saved)
        return torch.tensor(saved, dtype=torch.float64)

    def plan(self):
        plan = plan_compression(self.model, self.config, self.batches, self.layer_scores)
        per_block: dict[int, dict[str, nn.Linear]] = {}
        for name, linear in plan.targets.items():
            head = f"{self.prefix}."
            index = name[len(head):].split(".", 1)[0] if name.startswith(head) else ""
            if not index.isdigit():
                raise ValueError(f"streaming compresses Linears inside the blocks ({self.prefix}"
                                 f".N); {name!r} lies outside: leave it out (exclude=) or "
                                 f"compress in memory")
            per_block.setdefault(int(index), {})[name] = linear
        for index, inside in per_block.items():
            head = f"{self.prefix}.{index}."
            check_block_targets(self.model, self.config, {name[len(head):] for name in inside})
        keeps = dict.fromkeys(per_block, plan.keep)
        if self.config.method == "pairwise":  # the in-memory floor, before any calibration
            floor = keep_floor(self.blocks, {
                index: {name[len(f"{self.prefix}.{index}."):]: linear
                        for name, linear in inside.items()}
                for index, inside in per_block.items()}, plan.keep)
            if self.config.allocation == "importance":
                indices = sorted(per_block)
                sizes = [sum(linear.weight.numel() for linear in per_block[i].values())
                         for i in indices]
                keeps = dict(zip(indices, block_keeps(self.layer_scores()[indices], sizes,
                                                      plan.keep, self.config.temperature, floor),
                                 strict=True))
        return plan, per_block, keeps

    def base_names(self) -> list[str]:
        """The tensors outside the blocks that the shards hold (tied copies are not stored)."""
        state = self.model.state_dict(keep_vars=True)
        inside = f"{self.prefix}."
        stored = {id(tensor) for name, tensor in state.items() if name in self.reader}
        names = []
        for name, tensor in state.items():
            if name.startswith(inside):
                continue
            if name in self.reader:
                names.append(name)
            elif id(tensor) not in stored:
                raise ValueError(f"{self.reader.folder} holds no tensor {name!r}")
        return names

    def write_base(self, names: list[str]) -> None:
        """Each tensor outside the blocks, as stored (cast to the model's dtype), in a shard
        of its own, copied a block of rows at a time: none is held whole."""
        if self.record.finished("base") is not None:
            return
        state = self.model.state_dict(keep_vars=True)
        weight_map, files, size = {}, {}, 0
        for position, name in enumerate(names, start=1):
            shape, dtype = tuple(state[name].shape), state[name].dtype
            stored, _ = self.reader.shape_and_dtype(name)
            if stored != shape:
                raise ValueError(f"{self.reader.folder}: tensor {name!r} has shape {stored}, "
                                 f"the model's config expects {shape}")
            file = shard_name(position, self.file_count)
            files[file] = self.record.write_file(file, partial(
                write_tensor_file, name=name, dtype=dtype, shape=shape,
                blocks=self.reader.row_blocks(name)))
            weight_map[name] = file
            size += torch.Size(shape).numel() * dtype.itemsize
        self.record.record_step("base", {"weight_map": weight_map, "files": files,
                                         "tensor_bytes": size, "modules": {}, "reports": [],
                                         "seconds": 0.0})

    def replay_finished(self, index: int, block: nn.Module, entry: dict) -> None:
        """Move the streams past a block a killed run finished: the dense block read from the
        model, the compressed one rebuilt from its recorded shard."""
        if self.dense_inputs is not None:
            fill(block, f"{self.prefix}.{index}.", self.reader)
            self.dense_inputs = next_block_inputs(block, self.dense_inputs)
            release(block)
        if self.inputs is not None:
            specs = {"modules": entry["modules"]}
            apply_compression_config(self.model, specs)
            head = f"{self.prefix}.{index}."
            state = {}
            for file in entry["files"]:
                state.update({name[len(head):]: tensor for name, tensor in
                              load_file(self.record.shard_path(file)).items()})
            block.load_state_dict(state, assign=True, strict=True)
            finish_loading(self.model, specs)
            self.inputs = next_block_inputs(block, self.inputs)
            release(block)

    def compress_one(self, index: int, block: nn.Module, inside: dict, keep: float,
                     want_next: bool) -> list[ModuleReport]:
        fill(block, f"{self.prefix}.{index}.", self.reader)
        want_dense = want_next and self.dense_inputs is not None
        if inside:
            reports, dense_next = compress_block(
                self.model, self.config, keep, self.prefix, index, block, inside, self.inputs,
                self.dense_inputs, want_dense)
            head = f"{self.prefix}.{index}."
            for name, linear in inside.items():  # swapped out of the block: freed with it no more
                if block.get_submodule(name[len(head):]) is not linear:  # (a method may keep one)
                    release(linear)
        else:
            reports = []
            dense_next = next_block_inputs(block, self.dense_inputs) if want_dense else None
        if want_next and self.inputs is not None:
            self.inputs = next_block_inputs(block, self.inputs)
        self.dense_inputs = dense_next
        return reports

    def record_block(self, index: int, block: nn.Module, reports, seconds: float) -> None:
        head = f"{self.prefix}.{index}."
        tensors = block.state_dict(prefix=head)
        file = shard_name(len(self.base) + index + 1, self.file_count)
        size = self.record.write_shard(file, tensors)
        modules = {head + local: module_spec(module) for local, module in block.named_modules()
                   if isinstance(module, FACTORED_CLASSES)}
        self.record.record_step(str(index), {
            "weight_map": dict.fromkeys(tensors, file), "files": {file: size},
            "tensor_bytes": sum(t.nbytes for t in tensors.values()), "modules": modules,
            "reports": [asdict(r) for r in reports], "seconds": seconds,
            "rng_state": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()})

    def compress(self, show_progress: bool):
        plan, per_block, keeps = self.plan()
        last_target = max(per_block)
        hidden = getattr(self.model.config, "hidden_size", 0)
        _check_block_fits(block_memory(self.blocks[last_target], per_block[last_target],
                                       self.streams, self.batches, hidden),
                          self.reader.folder)
        self.write_base(self.base)
        done = [i for i in range(len(self.blocks)) if self.record.finished(str(i))]
        if self.record.resumed and done:
            self.log(f"resuming the streaming run in {self.record.folder}: blocks "
                     f"{done[0]}..{done[-1]} are finished and skipped")
            # randomized methods (CURing's sketches) go on from the generator's state there
            state = base64.b64decode(self.record.finished(str(done[-1]))["rng_state"])
            torch.set_rng_state(torch.frombuffer(bytearray(state), dtype=torch.uint8))
        needs_streams = METHODS[self.config.method][1] and (
            self.streams.dense or self.streams.compressed)
        self.inputs = self.dense_inputs = None
        if needs_streams and len(done) < len(self.blocks):
            first = self.first_inputs()
            self.inputs = first if self.streams.compressed else None
            self.dense_inputs = first if self.streams.dense else None
            self._first_inputs = None  # the streams move on: block 0's inputs are not kept
        bar = tqdm(total=len(self.blocks), initial=len(done), desc="compress blocks",
                   unit="block", disable=not show_progress)
        try:
            for index, block in enumerate(self.blocks):
                want_next = needs_streams and index < last_target
                entry = self.record.finished(str(index))
                if entry is not None:
                    if want_next and len(done) < len(self.blocks):
                        self.replay_finished(index, block, entry)
                    continue
                start = time.perf_counter()
                reports = self.compress_one(index, block, per_block.get(index, {}),
                                            keeps.get(index, plan.keep), want_next)
                self.record_block(index, block, reports, time.perf_counter() - start)
                release(block)
                bar.update(1)
                bar.set_postfix_str(f"rss {resident_memory() / GB:.2f} GB")
                if self.on_block_done is not None:
                    self.on_block_done(index)
        finally:
            bar.close()
        steps = [self.record.finished(str(i)) for i in range(len(self.blocks))]
        reports = [ModuleReport(**{**r, "shape": tuple(r["shape"])})
                   for step in steps for r in step["reports"]]
        modules = {name: spec for step in steps for name, spec in step["modules"].items()}
        report = CompressionReport(self.config.method, plan.keep, reports,
                                   sum(step["seconds"] for step in steps))
        return report, compression_metadata(self.config, plan), modules
