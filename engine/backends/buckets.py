"""The shapes a CUDA graph is captured for, and padding a batch up to one of them.

A captured graph replays one fixed shape, so batches are padded up to the nearest bucket: rows to
a power of two, width to a multiple of 32 (16 for the shortest). Only shapes of up to
`max_tokens` padded tokens get a graph: those are the passes whose time is mostly Python
launching kernels (docs/gpu.md#one-forward-pass-by-shape); bigger ones keep the GPU busy longer than their launch
and run eagerly. Padding never changes a score: padded columns are masked, and a padded row is a
single attended `<pad>` token whose logit is thrown away (no row is fully masked, so no NaN).
"""

from __future__ import annotations

import numpy as np

from engine.backends import PaddedBatch

WIDTH_STEP = 32


class Buckets:
    def __init__(self, max_tokens: int, max_width: int) -> None:
        self.max_tokens = max_tokens
        top = min(max_width, 512)
        self.widths = [16] + list(range(WIDTH_STEP, top + WIDTH_STEP, WIDTH_STEP))
        self.widths = [w for w in self.widths if w < top + WIDTH_STEP]

    def shapes(self) -> list[tuple[int, int]]:
        """Every (rows, width) bucket, largest first."""
        out = []
        for width in self.widths:
            rows = 1
            while rows * width <= self.max_tokens:
                out.append((rows, width))
                rows *= 2
        return sorted(out, key=lambda s: -s[0] * s[1])

    def fit(self, rows: int, width: int) -> tuple[int, int] | None:
        """The smallest bucket that holds a batch of this shape, or None (run it eagerly)."""
        for w in self.widths:
            if w >= width:
                r = 1 << max(rows - 1, 0).bit_length()
                return (r, w) if r * w <= self.max_tokens else None
        return None


def pad_to(batch: PaddedBatch, rows: int, width: int, pad_id: int) -> PaddedBatch:
    ids = np.full((rows, width), pad_id, dtype=np.int64)
    ids[: batch.rows, : batch.width] = batch.ids
    lengths = np.ones(rows, dtype=np.int32)  # padded rows: one attended <pad>
    lengths[: batch.rows] = batch.lengths
    return PaddedBatch(ids=ids, lengths=lengths)
