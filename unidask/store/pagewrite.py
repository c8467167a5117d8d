"""The merged database's ``unitaries`` table written as SQLite's own b-tree pages, by numpy, in the
``pages.Layout``: rows in id order, a fixed number of rows per leaf page, the leaves in id order
from one page on (the lock-byte page skipped), then the interior pages. The file is a normal
database (sqlite.org/fileformat2.html); the layout only makes a row's place computable.

SQLite makes the file, its schema and its small tables (meta, tasks) and an empty ``unitaries``
table; the writer appends the table's leaves after the file's last page, its interior pages after
those, writes the top page over the table's root page, and sets the header's page count. What it
wrote is proven by ``pageread.prove`` before the file is published.

Rows of fixed size without meta only, whose record fits in a page (no overflow chain): complex128
up to n = 63 at 64 KiB pages. Others are merged by SQLite (``merge.py``).
"""

from __future__ import annotations

import errno
import os
import struct
from dataclasses import asdict

import numpy as np

from .pages import (
    HEADER_COUNTER,
    HEADER_PAGES,
    HEADER_VALID_FOR,
    INTERIOR,
    LEAF,
    Layout,
    leaf_offsets,
    lock_page,
    varint,
    varint_len,
    varints,
)


def pwrite_all(fd: int, data, offset: int) -> None:
    """Write all of ``data`` at ``offset``: a short write is written on from where it stopped
    (Linux writes at most ~2 GiB a call), and one that writes nothing is ENOSPC."""
    view = memoryview(data).cast("B")
    while len(view):
        n = os.pwrite(fd, view, offset)
        if n <= 0:
            raise OSError(errno.ENOSPC, f"wrote nothing of {len(view)} bytes at offset {offset}")
        view, offset = view[n:], offset + n


class LeafWriter:
    """Leaf pages of a table in ``layout`` written at their places in the open file ``fd``: rows
    from the ``k``-th on (``k`` a multiple of ``per_leaf``) in leaf ``first_leaf + k // per_leaf``.
    Any process may write any whole leaves, in any order. The pages are built in one buffer,
    reused from write to write (a fresh one costs a page fault every 4 KiB)."""

    def __init__(self, fd: int, layout: Layout):
        self.fd, self.layout = fd, layout
        self.prefix = np.frombuffer(varint(layout.payload_size), np.uint8)
        self.payload = np.frombuffer(layout.payload, np.uint8)
        self.buffer = np.zeros((0, layout.page_size), np.uint8)

    def write(self, first_row: int, ids: np.ndarray, data: np.ndarray) -> None:
        """Rows ``first_row ...`` (ids increasing; an ``(N, row_bytes)`` uint8 array): whole leaves,
        the last one short only where the table ends."""
        lay, c = self.layout, self.layout.per_leaf
        if first_row % c:
            raise ValueError(f"row {first_row} does not begin a leaf of {c} rows")
        ids = np.asarray(ids, dtype=np.int64)
        count = -(-len(ids) // c)
        if len(self.buffer) < count:
            self.buffer = np.empty((count, lay.page_size), np.uint8)
        pages = self.buffer[:count]
        id_len = varint_len(ids)
        whole = len(ids) // c
        per_page = id_len[:whole * c].reshape(whole, c)
        uniform = per_page.min(axis=1) == per_page.max(axis=1)
        q = 0
        while q < count:
            if q < whole and uniform[q]:   # a run of whole pages whose ids have one varint length
                end = q + 1
                while end < whole and uniform[end] and per_page[end, 0] == per_page[q, 0]:
                    end += 1
                self._leaves(pages[q:end], ids[q * c:end * c], data[q * c:end * c], int(per_page[q, 0]))
                q = end
            else:
                lo, hi = q * c, min((q + 1) * c, len(ids))
                self._leaf(pages[q], ids[lo:hi], data[lo:hi], id_len[lo:hi])
                q += 1
        numbers = lay.leaf_page(first_row // c + np.arange(count))
        for run in np.split(np.arange(count), np.flatnonzero(np.diff(numbers) != 1) + 1):   # around the lock-byte page
            pwrite_all(self.fd, pages[run[0]:run[-1] + 1], (int(numbers[run[0]]) - 1) * lay.page_size)

    def _leaves(self, pages: np.ndarray, ids: np.ndarray, data: np.ndarray, id_len: int) -> None:
        """Whole leaves whose cells are all one size: each array operation fills every page."""
        n, c, lp, pl = len(pages), self.layout.per_leaf, len(self.prefix), len(self.payload)
        size = lp + id_len + self.layout.payload_size
        top = self.layout.page_size - c * size
        pages[:, :8] = 0   # no freeblock, no fragmented bytes; then the free space between:
        pages[:, 8 + 2 * c:top] = 0   # a merge is byte for byte the same, whatever the buffer held
        pages[:, 0] = LEAF
        pages[:, 3:5] = np.frombuffer(struct.pack(">H", c), np.uint8)
        pages[:, 5:7] = np.frombuffer(struct.pack(">H", top % 65536), np.uint8)
        pages[:, 8:8 + 2 * c] = (top + size * np.arange(c)).astype(">u2").view(np.uint8)
        cells = pages[:, top:].reshape(n, c, size)
        cells[:, :, :lp] = self.prefix
        cells[:, :, lp:lp + id_len] = varints(ids, id_len).reshape(n, c, id_len)
        cells[:, :, lp + id_len:lp + id_len + pl] = self.payload
        cells[:, :, lp + id_len + pl:] = data.reshape(n, c, -1)

    def _leaf(self, page: np.ndarray, ids: np.ndarray, data: np.ndarray, id_len: np.ndarray) -> None:
        n, lp, pl = len(ids), len(self.prefix), len(self.payload)
        sizes = lp + id_len + self.layout.payload_size
        offsets, top = leaf_offsets(self.layout, ids)
        page[:] = 0
        page[0] = LEAF
        page[3:5] = np.frombuffer(struct.pack(">H", n), np.uint8)
        page[5:7] = np.frombuffer(struct.pack(">H", top % 65536), np.uint8)   # 0 stands for 65536
        page[8:8 + 2 * n] = offsets.astype(">u2").view(np.uint8)
        # runs of cells whose rowids have one length are equal-sized and contiguous: one strided
        # view each (a page has one run, or two where the ids cross a varint length)
        starts = np.flatnonzero(np.diff(id_len, prepend=-1))
        for a, b in zip(starts, [*starts[1:], n]):
            size = int(sizes[a])
            cells = page[offsets[a]:offsets[a] + (b - a) * size].reshape(b - a, size)
            L = int(id_len[a])
            cells[:, :lp] = self.prefix
            cells[:, lp:lp + L] = varints(ids[a:b], L)
            cells[:, lp + L:lp + L + pl] = self.payload
            cells[:, lp + L + pl:] = data[a:b]


class TableWriter:
    """Write one rowid table's rows, given in id order, as leaf pages appended at ``first_leaf``
    of the open file ``fd``; :meth:`finish` adds the interior pages, writes the top one over the
    table's ``root`` page and sets the page count."""

    def __init__(self, fd: int, layout: Layout, root: int | None = None, first_row: int = 0):
        """``first_row`` (a multiple of ``per_leaf``): a part of the table, from that row on, that
        another process finishes (``root`` None)."""
        self.fd, self.root, self.layout = fd, root, layout
        self.leaves = LeafWriter(fd, layout)
        self.pending_ids: list[np.ndarray] = []
        self.pending_data: list[np.ndarray] = []
        self.pending = 0
        self.keys: list[np.ndarray] = []   # each leaf's largest id
        self.rows = first_row
        self.last_id = -1

    def add(self, ids: np.ndarray, data: np.ndarray) -> None:
        """Rows ``ids`` (increasing, above every id added before) with their data, an (N, row_bytes)
        uint8 array. Whole leaves are written as they fill."""
        ids = np.asarray(ids, dtype=np.int64)
        if len(ids) == 0:
            return
        if ids[0] <= self.last_id or (len(ids) > 1 and np.any(np.diff(ids) <= 0)):
            raise ValueError("rows must come in increasing id order")
        self.last_id = int(ids[-1])
        data = data.reshape(len(ids), self.layout.row_bytes)
        c = self.layout.per_leaf
        # the rows of a leaf begun are copied: the caller may reuse its arrays
        if self.pending:   # the leaf begun by the rows before
            need = c - self.pending
            self.pending_ids.append(ids[:need].copy())
            self.pending_data.append(data[:need].copy())
            self.pending += len(ids[:need])
            ids, data = ids[need:], data[need:]
            if self.pending == c:
                self.flush()
        whole = len(ids) // c * c
        if whole:
            self._write(ids[:whole], data[:whole])
        if whole < len(ids):
            self.pending_ids, self.pending_data = [ids[whole:].copy()], [data[whole:].copy()]
            self.pending = len(ids) - whole

    def take_pending(self) -> tuple[np.ndarray, np.ndarray]:
        """The rows of the leaf begun and not written (ids, data), no longer this writer's."""
        out = (np.concatenate(self.pending_ids), np.concatenate(self.pending_data)) if self.pending else \
            (np.zeros(0, np.int64), np.zeros((0, self.layout.row_bytes), np.uint8))
        self.pending_ids, self.pending_data, self.pending = [], [], 0
        return out

    def flush(self) -> None:
        """Write the leaf begun, short (the table's last)."""
        if self.pending:
            self._write(*self.take_pending())

    def _write(self, ids: np.ndarray, data: np.ndarray) -> None:
        self.leaves.write(self.rows, ids, data)
        c = self.layout.per_leaf
        self.keys.append(ids[np.minimum(np.arange(c - 1, len(ids) + c - 1, c), len(ids) - 1)])
        self.rows += len(ids)

    def finish(self) -> Layout:
        """Write the last leaf, the interior pages and the root; set the header's page count.
        Returns the layout."""
        self.flush()
        layout = Layout(**{**asdict(self.layout), "leaves": sum(map(len, self.keys)), "rows": self.rows})
        keys = np.concatenate(self.keys) if self.keys else np.zeros(0, np.int64)
        return finish_table(self.fd, layout, self.root, keys)


def finish_table(fd: int, layout: Layout, root: int, keys: np.ndarray) -> Layout:
    """Over the ``layout.leaves`` leaves written (``keys``: each one's largest id): the interior
    pages after them, the top one over the table's ``root`` page; the header's page count set and
    the file cut there. Returns the layout as the file has it (a single leaf is the root itself)."""
    lay = layout
    if not lay.leaves:   # no row: the root stays SQLite's empty leaf
        _set_page_count(fd, lay.first_leaf - 1)
        os.ftruncate(fd, (lay.first_leaf - 1) * lay.page_size)
        return Layout(**{**asdict(lay), "leaves": 0, "rows": 0})
    if lay.leaves == 1:   # a single leaf: it is the root itself
        only = os.pread(fd, lay.page_size, (lay.first_leaf - 1) * lay.page_size)
        pwrite_all(fd, only, (root - 1) * lay.page_size)
        _set_page_count(fd, lay.first_leaf - 1)
        os.ftruncate(fd, (lay.first_leaf - 1) * lay.page_size)
        return Layout(**{**asdict(lay), "first_leaf": root})
    interior, count = interior_pages(lay, root, keys)
    for page, data in interior:
        pwrite_all(fd, data, (page - 1) * lay.page_size)
    _set_page_count(fd, count)
    os.ftruncate(fd, count * lay.page_size)
    return lay


def interior_pages(layout: Layout, root: int, keys: np.ndarray) -> tuple[list[tuple[int, np.ndarray]], int]:
    """The interior pages over the layout's leaves (two or more; ``keys``: each one's largest
    id), as ``(page number, bytes)``: the top one is ``root``, the others on the pages after the
    leaves, the lock-byte page skipped; and the file's page count then."""
    lock, last = lock_page(layout.page_size), layout.end - 1
    level = list(zip(np.asarray(layout.leaf_page(np.arange(layout.leaves))).tolist(), keys.tolist()))
    fanout = (layout.page_size - 12) // (2 + 4 + 9)
    out = []
    while len(level) > 1:
        groups = -(-len(level) // fanout)
        bounds = np.linspace(0, len(level), groups + 1).round().astype(int)   # even: none nearly empty
        parents = []
        for g in range(groups):
            children = level[bounds[g]:bounds[g + 1]]
            if groups > 1:
                last += 1 + (last + 1 == lock)
                page = last
            else:
                page = root
            out.append((page, _interior(children, layout.page_size)))
            parents.append((page, children[-1][1]))
        level = parents
    return out, last


def _set_page_count(fd: int, pages: int) -> None:
    header = bytearray(os.pread(fd, 100, 0))
    counter = struct.unpack(">I", header[HEADER_COUNTER:HEADER_COUNTER + 4])[0] + 1
    header[HEADER_PAGES:HEADER_PAGES + 4] = struct.pack(">I", pages)
    header[HEADER_COUNTER:HEADER_COUNTER + 4] = struct.pack(">I", counter)
    header[HEADER_VALID_FOR:HEADER_VALID_FOR + 4] = struct.pack(">I", counter)
    pwrite_all(fd, bytes(header), 0)


def _interior(children: list[tuple[int, int]], page_size: int) -> np.ndarray:
    """An interior table page over ``children`` ((page, largest id) each): a cell per child but
    the last, which is the right-most pointer."""
    cells = [struct.pack(">I", page) + varint(key) for page, key in children[:-1]]
    total = sum(map(len, cells))
    top = page_size - total
    out = bytearray(page_size)
    out[0] = INTERIOR
    out[3:5] = struct.pack(">H", len(cells))
    out[5:7] = struct.pack(">H", top % 65536)
    out[8:12] = struct.pack(">I", children[-1][0])
    offset = top
    for i, cell in enumerate(cells):
        out[12 + 2 * i:14 + 2 * i] = struct.pack(">H", offset)
        out[offset:offset + len(cell)] = cell
        offset += len(cell)
    return np.frombuffer(bytes(out), np.uint8)


