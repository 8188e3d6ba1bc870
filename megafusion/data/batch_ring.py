"""Shared-memory slots that loader workers collate micro-batches into, handed to the caller as views.

Handing a worker's batch over as fresh shared tensors costs the caller a file descriptor per storage, a new
mapping and a page fault per 4 KiB on first touch: more than building the batch. The ring is mapped once, before
the workers fork. A worker `take`s a free slot of its range (the most recently released one, the likeliest to
be still cached), collates into it through `writer`, and sends the writer's field table; the caller's `lease`
wraps the slot as the Batch's tensors, and a finalizer on their common base frees the slot again when the caller
drops the last of them. When all of a worker's slots are held, it sends its batch by value instead (`take`
returns -1; workers.py).
"""

from __future__ import annotations

import math
import weakref
from typing import List, Tuple

import numpy as np
import torch

from megafusion.data.batch import Batch
from megafusion.data.collate import batch_from_fields

_ALIGN, _SKEW = 64, 1024  # a field starts 1 KiB past the aligned end of the previous one (collate._skewed_empty)


class BatchRing:
    """`slots` slots of `sum(field_bytes)` bytes (each field padded and skewed), a free flag per slot and the
    release order, in shared memory."""

    def __init__(self, slots: int, field_bytes: List[int]):
        self.slots = slots
        self.slot_bytes = sum(_padded(n) for n in field_bytes)
        self.buffer = torch.empty(slots * self.slot_bytes, dtype=torch.uint8).share_memory_()
        self.free = torch.ones(slots, dtype=torch.uint8).share_memory_()
        # when each slot was last released (a count of releases): the newest free one is written next
        self.released = torch.zeros(slots, dtype=torch.int64).share_memory_()
        self._releases = 0  # counted by the process that leases (the finalizers run there)
        self._views()

    def _views(self) -> None:
        """numpy views of the shared tensors (a .numpy() call per use costs more than the use)."""
        self._buffer, self._free, self._released = self.buffer.numpy(), self.free.numpy(), self.released.numpy()

    def __getstate__(self):  # a spawned worker gets the shared tensors, and makes its own views of them
        return {k: v for k, v in self.__dict__.items() if k not in ("_buffer", "_free", "_released")}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._views()

    def take(self, first: int = 0, count: int = -1) -> int:
        """(builder) The most recently released free slot among first .. first + count - 1 (count -1: all
        slots from first on), now in use; -1 when the caller holds them all."""
        end = self.slots if count < 0 else first + count
        free = np.flatnonzero(self._free[first:end].copy())  # a snapshot: the caller frees slots meanwhile
        if not len(free):
            return -1
        slot = first + int(free[self._released[first:end][free].argmax()])
        self._free[slot] = 0
        return slot

    def writer(self, slot: int) -> "SlotWriter":
        return SlotWriter(self._buffer[slot * self.slot_bytes: (slot + 1) * self.slot_bytes])

    def lease(self, slot: int, table) -> Batch:
        """(caller) The batch `writer` wrote into `slot`, as views of the slot; the slot is freed once they are
        all dropped."""
        base = slot * self.slot_bytes
        # frombuffer of a fresh memoryview: the fields' numpy base is this array, so its finalizer fires exactly
        # when the last field tensor (torch.from_numpy keeps its array alive) is gone
        data = np.frombuffer(memoryview(self._buffer)[base: base + self.slot_bytes], dtype=np.uint8)
        fields = {name: np.ndarray(shape, dtype, data, at) for name, dtype, shape, at in table}
        weakref.finalize(data, self.release, slot)
        return batch_from_fields(fields)

    def release(self, slot: int) -> None:
        """(caller) Free `slot`: every tensor of its batch was dropped."""
        self._releases += 1
        self._released[slot] = self._releases
        self._free[slot] = 1


def _padded(nbytes: int) -> int:
    return -(-nbytes // _ALIGN) * _ALIGN + _SKEW


class SlotWriter:
    """The `alloc` of collate's *_fields functions for one slot: fields back to back, each at a different offset
    within a page; `table` records where each went (name, dtype, shape, byte offset)."""

    def __init__(self, data: np.ndarray):
        self.data, self.offset = data, 0
        self.table: List[Tuple[str, str, Tuple[int, ...], int]] = []

    def __call__(self, name: str, shape: Tuple[int, ...], dtype) -> np.ndarray:
        dt = np.dtype(dtype)
        nbytes = math.prod(shape) * dt.itemsize
        at = self.offset
        if at + nbytes > len(self.data):
            raise RuntimeError(f"batch field {name} of {nbytes} bytes at {at} exceeds the ring slot of "
                               f"{len(self.data)} bytes")
        self.offset = at + _padded(nbytes)
        self.table.append((name, dt.str, shape, at))
        return self.data[at: at + nbytes].view(dt).reshape(shape)
