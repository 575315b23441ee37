"""KV caches in pinned host memory, streamed to the GPU layer by layer (one 24 GB card).

At 704x384 the four timestep-forced caches are 43.7 GB bf16 / 21.9 GB fp8: they cannot stay on a 24 GB GPU
next to the weights. Every step's cache lives in pinned host RAM; while layer l computes, layer l+1's rows of
the current step are copied in on a side stream (double buffer), and the block's new rows go back to the host
after the layer wrote them. Only two layers' caches are on the GPU at any time. The result is bit-identical to
the resident cache: the same rows are attended in the same order.
"""

from __future__ import annotations

import torch


class LayerBuffers:
    """Two device buffers for one layer's K and V, shared by all steps (only one step runs at a time)."""

    def __init__(self, capacity: int, heads: int, head_dim: int, dtype, device):
        shape = (capacity, heads, head_dim)
        self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(2)]
        self.v = [torch.empty(shape, dtype=dtype, device=device) for _ in range(2)]
        self.ready = [None, None]  # CUDA events: the buffer's prefetch finished
        self.owner = [None, None]  # (step object id, layer) held by each buffer

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


class HostKV:
    """Same interface as StepKV; storage in (pinned) host memory, prefetched per layer onto `device`."""

    def __init__(self, layers, capacity: int, heads: int, head_dim: int, dtype, device, buffers: LayerBuffers):
        self.capacity = capacity
        self.dtype = dtype
        self.device = torch.device(device)
        self.layers = list(layers)
        pin = self.device.type == "cuda"
        shape = (capacity, heads, head_dim)
        self.k = {i: torch.zeros(shape, dtype=dtype, pin_memory=pin) for i in self.layers}
        self.v = {i: torch.zeros(shape, dtype=dtype, pin_memory=pin) for i in self.layers}
        self.buffers = buffers
        self.stream = torch.cuda.Stream(self.device) if pin else None
        self.valid = 0  # rows filled so far (the ring buffer is full once start + n >= capacity)
        self.events: list[str] = []  # for tests: the order of prefetches and write-backs

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for d in (self.k, self.v) for t in d.values())

    def _slot(self, layer: int) -> int:
        return self.layers.index(layer) % 2

    def prefetch(self, layer: int, rows: int) -> None:
        """Start copying `rows` rows of `layer` into its device buffer (asynchronous on CUDA)."""
        slot = self._slot(layer)
        b = self.buffers
        if b.owner[slot] == (id(self), layer):
            return
        self.events.append(f"prefetch {layer}")
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))  # the buffer's last reader is done
            with torch.cuda.stream(self.stream):
                b.k[slot][:rows].copy_(self.k[layer][:rows], non_blocking=True)
                b.v[slot][:rows].copy_(self.v[layer][:rows], non_blocking=True)
                b.ready[slot] = torch.cuda.Event()
                b.ready[slot].record(self.stream)
        else:
            b.k[slot][:rows].copy_(self.k[layer][:rows])
            b.v[slot][:rows].copy_(self.v[layer][:rows])
        b.owner[slot] = (id(self), layer)

    def old_rows(self, start: int) -> int:
        """Rows written by earlier blocks: all of them once the ring buffer has wrapped."""
        return self.capacity if start >= self.capacity else start

    def begin(self, start: int) -> None:
        """Before a forward: prefetch the first layer of this step."""
        self.prefetch(self.layers[0], self.old_rows(start))

    def write_and_read(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor):
        n = k.shape[0]
        pos = start % self.capacity
        valid = min(start + n, self.capacity)
        old_rows = self.old_rows(start)
        slot = self._slot(layer)
        self.prefetch(layer, old_rows)  # no-op when begin() or the previous layer already did it
        b = self.buffers
        if self.stream is not None and b.ready[slot] is not None:
            torch.cuda.current_stream(self.device).wait_event(b.ready[slot])
        b.k[slot][pos : pos + n] = k.to(self.dtype)
        b.v[slot][pos : pos + n] = v.to(self.dtype)
        self.write_back(layer, slot, pos, n)
        nxt = self.layers.index(layer) + 1
        if nxt < len(self.layers):
            self.prefetch(self.layers[nxt], old_rows)
        return b.k[slot][:valid].to(k.dtype), b.v[slot][:valid].to(v.dtype)

    def write_back(self, layer: int, slot: int, pos: int, n: int) -> None:
        """Copy this block's new rows to the host copy (after they are computed, on the side stream)."""
        self.events.append(f"write-back {layer}")
        b = self.buffers
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.stream):
                self.k[layer][pos : pos + n].copy_(b.k[slot][pos : pos + n], non_blocking=True)
                self.v[layer][pos : pos + n].copy_(b.v[slot][pos : pos + n], non_blocking=True)
        else:
            self.k[layer][pos : pos + n].copy_(b.k[slot][pos : pos + n])
            self.v[layer][pos : pos + n].copy_(b.v[slot][pos : pos + n])
        b.owner[slot] = None if self.stream is None else b.owner[slot]


def host_caches(layers, steps: int, capacity: int, heads: int, head_dim: int, dtype, device) -> list[HostKV]:
    buffers = LayerBuffers(capacity, heads, head_dim, dtype, device)
    return [HostKV(layers, capacity, heads, head_dim, dtype, device, buffers) for _ in range(steps)]
