"""SFT samples -> training rows, on NumPy / Arrow columns (never one Python list of the whole set).

`pack_bins` is the packer: first-fit decreasing by best fit (each sample, longest first, goes into the
fullest row that still has room for it; ties go to the oldest row), whole samples only. `write_rows`
streams rows of input_ids / labels / position_ids into an Arrow file, a chunk of rows at a time.
"""
from __future__ import annotations

import bisect
import heapq

import numpy as np
import pyarrow as pa

from lmtrain.data.packing import IGNORE_INDEX, positions_in_segments

ROW_TOKENS = 4_000_000  # tokens of rows built at once (~100 MB of NumPy buffers)


def pack_bins(lengths: np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray]:
    """(order, starts): sample indices row after row; row b holds order[starts[b]:starts[b + 1]], in the
    order they were placed (longest first). The same rows as the list-based `pack_samples` it replaces.

    Free space is an integer in [1, capacity], so the "fullest row with room" lookup is a bisect over the
    distinct free-space values (at most `capacity` of them) plus a heap of row indices per value: O(log)
    per sample instead of an insert into one sorted list of every open row (quadratic at a million)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(-lengths, kind="stable")  # ties keep input order, as sorted() does
    spaces: list[int] = []  # distinct free-space values that some row has, sorted
    rows_with: dict[int, list[int]] = {}  # free space -> heap of row indices
    row_of = np.empty(len(lengths), dtype=np.int64)
    rows = 0
    for i, length in zip(order.tolist(), lengths[order].tolist()):
        slot = bisect.bisect_left(spaces, length)
        if slot == len(spaces):
            row, space = rows, capacity - length
            rows += 1
        else:
            space = spaces[slot]
            heap = rows_with[space]
            row = heapq.heappop(heap)
            if not heap:
                del rows_with[space]
                spaces.pop(slot)
            space -= length
        row_of[i] = row
        if space > 0:
            heap = rows_with.get(space)
            if heap is None:
                rows_with[space] = heap = []
                bisect.insort(spaces, space)
            heapq.heappush(heap, row)
    placed = order[np.argsort(row_of[order], kind="stable")]  # by row, placement order inside a row
    starts = np.concatenate([[0], np.cumsum(np.bincount(row_of, minlength=rows))]).astype(np.int64)
    return placed, starts


ROW_SCHEMA = pa.schema({name: pa.list_(pa.int32()) for name in ("input_ids", "labels", "position_ids")})


def _list_array(flat: np.ndarray, lengths: np.ndarray) -> pa.ListArray:
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat.astype(np.int32, copy=False)))


def rows_table(ids: np.ndarray, labels: np.ndarray, lengths: np.ndarray, bin_sizes: np.ndarray | None,
               capacity: int, pad_id: int) -> pa.Table:
    """Rows from the flat ids / labels of consecutive samples (`lengths` each). Packed (`bin_sizes`: samples
    per row): each row holds its samples, positions restarting at each one, padded to `capacity` with a
    masked segment of its own. Unpacked (None): one sample per row, unpadded (the collator pads)."""
    positions = positions_in_segments(lengths)
    if bin_sizes is None:
        return pa.Table.from_arrays([_list_array(ids, lengths), _list_array(labels, lengths),
                                     _list_array(positions, lengths)], schema=ROW_SCHEMA)
    count = len(bin_sizes)
    row_of = np.repeat(np.arange(count), bin_sizes)
    used = np.bincount(row_of, weights=lengths, minlength=count).astype(np.int64)
    sample_end = np.cumsum(lengths)
    row_token_start = np.concatenate([[0], np.cumsum(used)[:-1]])
    start_in_row = sample_end - lengths - row_token_start[row_of]
    target = np.repeat(row_of * capacity + start_in_row, lengths) + positions
    out_ids = np.full(count * capacity, pad_id, dtype=np.int32)
    out_labels = np.full(count * capacity, IGNORE_INDEX, dtype=np.int32)
    # Padding is one segment per row: positions 0, 1, ... from the row's last real token on.
    out_positions = (np.tile(np.arange(capacity), count) - np.repeat(used, capacity)).astype(np.int32)
    out_ids[target], out_labels[target], out_positions[target] = ids, labels, positions
    full = np.full(count, capacity)
    return pa.Table.from_arrays([_list_array(out_ids, full), _list_array(out_labels, full),
                                 _list_array(out_positions, full)], schema=ROW_SCHEMA)


def write_rows(samples, order: np.ndarray, starts: np.ndarray | None, lengths: np.ndarray, capacity: int,
               pad_id: int, writer) -> int:
    """Write rows to `writer` (an ArrowWriter), a chunk of about ROW_TOKENS tokens at a time. `samples`: an
    arrow-formatted Dataset with input_ids / labels; `order`: its row indices in row order; `starts`: row
    boundaries in `order` (packed) or None (one sample per row); `lengths`: tokens of each `order` entry."""
    if starts is None:
        starts = np.arange(len(order) + 1)
        packed = False
    else:
        packed = True
    cumulative = np.concatenate([[0], np.cumsum(lengths)])
    rows, first = 0, 0
    while first < len(starts) - 1:
        # rows [first, last) hold at most ROW_TOKENS tokens (at least one row)
        limit = cumulative[starts[first]] + ROW_TOKENS
        last = max(first + 1, int(np.searchsorted(cumulative[starts], limit, side="right")) - 1)
        last = min(last, len(starts) - 1)
        a, b = int(starts[first]), int(starts[last])
        table = samples[order[a:b].tolist()]
        ids = table.column("input_ids").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        labels = table.column("labels").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        writer.write_table(rows_table(ids, labels, lengths[a:b], np.diff(starts[first:last + 1]) if packed else None,
                                      capacity, pad_id))
        rows += last - first
        first = last
    return rows
