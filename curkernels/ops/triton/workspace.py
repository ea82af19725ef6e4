"""Zeroed device buffers that the single-launch decode kernels keep across calls.

A buffer kept across calls must not come from a CUDA-graph memory pool: during torch.compile's
CUDA-graph warm-up the caching allocator sends the allocations of the current thread (of the
current stream, before torch 2.6) into the graph's private pool, and cudagraph trees then
refuse a pool block that outlives the graph's outputs. So persistent buffers are made by a
short-lived worker thread on a side stream, which the pool serves under neither rule. While
the current stream is being captured nothing is kept: the caller gets a fresh zeroed buffer
from the graph's pool, freed after the call like any temporary.

Kept workspaces are found by (device, stream, rank, link width, row block). The eager hot path
does not build that key: a memoized dispatch choice holds its layer's `ReservedWorkspaces`,
which keeps the workspaces of one stream (the first it serves: `prepare_for_inference`'s, or
the first call's) in a list indexed by the row count.
"""

import threading
from dataclasses import dataclass

import torch

from ..tables import DECODE_MAX_ROWS
from .decode_kernels import SYNC_WORDS

_side_streams: dict[int, torch.cuda.Stream] = {}


def capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    index = device.index if device.index is not None else torch.cuda.current_device()
    stream = _side_streams.get(index)
    if stream is None:
        stream = _side_streams[index] = torch.cuda.Stream(device=index)
    return stream


def zeros(numels: tuple[int, ...], dtypes: tuple[torch.dtype, ...],
          device: torch.device) -> list[torch.Tensor]:
    return [torch.zeros(n, dtype=d, device=device) for n, d in zip(numels, dtypes, strict=True)]


def persistent_zeros(numels: tuple[int, ...], dtypes: tuple[torch.dtype, ...],
                     device: torch.device) -> list[torch.Tensor]:
    """Zeroed 1-D tensors of these sizes and dtypes, allocated outside any CUDA-graph pool and
    ready for work queued next on the current stream. Not for use while capturing."""
    if device.type != "cuda":
        return zeros(numels, dtypes, device)
    side = _side_stream(device)
    made: dict = {}

    def allocate() -> None:
        try:
            with torch.cuda.device(side.device), torch.cuda.stream(side):
                made["buffers"] = zeros(numels, dtypes, side.device)
                made["zeroed"] = side.record_event()
        except BaseException as error:  # re-raised in the caller's thread
            made["error"] = error

    worker = threading.Thread(target=allocate, name="curkernels-workspace")
    worker.start()
    worker.join()
    if "error" in made:
        raise made["error"]
    torch.cuda.current_stream(device).wait_event(made["zeroed"])
    return made["buffers"]


@dataclass(frozen=True)
class DecodeWorkspace:
    sync: torch.Tensor        # int32 [arrivals, release flag, epoch, pad]
    sums: torch.Tensor        # fp32, two (block rows × r) shrink buffers
    first_sums: torch.Tensor  # view of the first buffer (the barrier-free path zeroes it)
    link: torch.Tensor        # fp32, block rows × c (full U)


_workspaces: dict[tuple, DecodeWorkspace] = {}


def decode_workspace(device: torch.device, r: int, c: int, rows: int) -> DecodeWorkspace:
    """Zeroed once and kept: captured CUDA graphs hold its pointers; one per stream, so that
    concurrent streams never share counters, and one per row block, whose buffers the kernel
    zeroes for its own next launch. While capturing, a workspace not made before is a fresh
    temporary of the graph (see `persistent_zeros`)."""
    # The raw-stream query Triton's own launcher uses: torch.cuda.current_stream() costs µs.
    stream = torch._C._cuda_getCurrentRawStream(device.index) if device.type == "cuda" else 0
    key = (device, stream, r, c, rows)
    workspace = _workspaces.get(key)
    if workspace is not None:
        return workspace
    numels = (SYNC_WORDS, 2 * rows * r, rows * c)
    dtypes = (torch.int32, torch.float32, torch.float32)
    kept = not capturing(device)
    sync, sums, link = (persistent_zeros if kept else zeros)(numels, dtypes, device)
    workspace = DecodeWorkspace(sync=sync, sums=sums, first_sums=sums[: rows * r], link=link)
    if kept:
        _workspaces[key] = workspace
    return workspace


class ReservedWorkspaces:
    """The kept decode workspaces of rank r and link width c on one device, for the stream
    they are first asked on (`prepare_for_inference` reserves them before serving), found by
    a list index on the row count: no key to build or hash per call. Asked on another stream,
    or while a capture is the first to ask, they defer to `decode_workspace`, so that
    concurrent streams never share counters."""

    def __init__(self, device: torch.device, r: int, c: int):
        self.device, self.r, self.c = device, r, c
        self.stream: int | None = None  # bound by the first call outside a capture
        self._cuda_index = device.index if device.type == "cuda" else None
        self._by_rows: list[DecodeWorkspace | None] = [None] * (DECODE_MAX_ROWS + 1)

    def get(self, M: int, rows: int) -> DecodeWorkspace:
        """The workspace of a call of M input rows, whose tiles hold `rows` (its row block)."""
        index = self._cuda_index
        stream = 0 if index is None else torch._C._cuda_getCurrentRawStream(index)
        if stream != self.stream:
            if self.stream is not None or capturing(self.device):
                return decode_workspace(self.device, self.r, self.c, rows)
            self.stream = stream
        workspace = self._by_rows[M]
        if workspace is None:
            workspace = decode_workspace(self.device, self.r, self.c, rows)
            if not capturing(self.device):  # a capture's temporary is not kept
                self._by_rows[M] = workspace
        return workspace


_reserved: dict[tuple, ReservedWorkspaces] = {}


def reserved_workspaces(device: torch.device, r: int, c: int) -> ReservedWorkspaces:
    """The one `ReservedWorkspaces` of (device, r, c), made empty on first request (nothing is
    allocated until its first call)."""
    key = (device, r, c)
    reserved = _reserved.get(key)
    if reserved is None:
        reserved = _reserved[key] = ReservedWorkspaces(device, r, c)
    return reserved
