"""A merged database's rows read straight from its pages (a memory map, no SQL), where the file is
proven to be in the page merge's layout; and the proof the merge runs on its own output before
it publishes it.

Nothing the file says about itself is taken on trust (its meta's ``layout.*`` rows, its change
counter: copies and other tools reproduce them); they only say what to check. Before a byte is
served: the header is a plain rollback-journal file of the stated pages; the table's interior
pages are byte for byte what the writer makes for that layout (so SQLite's descent reaches the
same leaves); every leaf a read touches is checked whole the first time (its type, cell count,
every cell pointer, and every cell's payload size, rowid and record header), so SQLite's own
search of that leaf finds the same cell; and each read checks the header has not changed since.
Where anything differs the reader is :class:`pages.Unreadable` and the caller goes to SQL.
"""

from __future__ import annotations

import os
from typing import Callable

import numpy as np

from .pages import (
    LEAF,
    VARINT_LIMITS,
    Layout,
    Mapped,
    Unreadable,
    layout_for,
    lock_page,
    read_varints,
    varint,
    varint_len,
)
from .pagewrite import interior_pages

CHECK_CELLS = 1 << 16   # cells checked at a time: their index arrays stay a few MiB


def _rows_are_ids(rows: np.ndarray) -> np.ndarray:
    return rows


class Changed(Unreadable):
    """The file is not the one the layout was recorded for, or changed while it was read: SQLite's
    to read (not damage)."""


class PageReader(Mapped):
    """The rows of a database in the merge's layout (ids 0 ... rows - 1, every one there), read from
    a memory map of the file at offsets computed from the layout: no SQL, no Python object per
    row. ``root``: the table's root page, as SQLite's schema says; ``counter``: the change
    counter the merge recorded (None: any); ``id_of``: each row's id (by default its index: ids
    0 ... rows - 1, what a reader by id needs). Raises :class:`Unreadable` unless the file is in
    ``layout`` (``Changed`` where its counter says it was written since)."""

    def __init__(self, path: str | os.PathLike, layout: Layout, root: int, counter: int | None = None,
                 id_of: Callable[[np.ndarray], np.ndarray] | None = None):
        super().__init__(path, layout.row_bytes)
        header = self.header()
        if counter is not None and header.change_counter != counter:
            raise Changed(f"{path}: written since it was merged (its change counter is {header.change_counter}, "
                          f"the merge left {counter})")
        header.plain(path, len(self.map))
        self.layout, self.pages = layout, header.pages
        self.id_of = id_of or _rows_are_ids
        self._prove_shape(layout, header.page_size)
        self.stamp = self._stamp()   # the header's versions and counter, watched by every read
        self.size = len(self.map)
        self.fd: int | None = None
        self.lock0 = lock_page(layout.page_size) - 1   # 0-based, as the reads count pages
        self.crosses = layout.leaves > 0 and layout.leaf_page(layout.leaves - 1) > self.lock0 + 1
        lp = len(varint(layout.payload_size))
        self.prefix, self.payload = np.frombuffer(varint(layout.payload_size), np.uint8), \
            np.frombuffer(layout.payload, np.uint8)
        self.before = lp + len(layout.payload)   # a cell's bytes before its data, less the rowid
        self.chunk = max(1, (1 << 20) // max(1, layout.row_bytes))
        self.pointers = self.map[:len(self.map) // 2 * 2].view(">u2")   # at even offsets, as cell pointers are
        self.step = self.before + layout.row_bytes   # a cell's bytes but its rowid's
        self.end = layout.page_size + self.before + 1   # from a page's end to a cell's data, past the rowid
        # the leaves whose cells are not evenly spaced: the last one where it is short, and where
        # a rowid grows a byte inside one (ids from 0: a leaf's ids are its rows)
        c, n = layout.per_leaf, layout.leaves
        odd = np.zeros(n, bool)
        if n:
            odd[-1] = layout.rows % c != 0
            grows = VARINT_LIMITS[VARINT_LIMITS < layout.rows]
            odd[(grows // c)[grows % c != 0]] = True
        self.odd = odd if odd.any() else None
        self.checked = np.zeros(layout.leaves, bool)
        self.all_checked = False
        self._prove_interior(root)
        if layout.leaves:
            self.check_leaves(np.array([layout.leaves - 1]))   # the last: the table ends where it says
        self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)   # its size, watched by every read

    def _prove_shape(self, lay: Layout, page_size: int) -> None:
        """The layout is one the writer makes, and the file holds it."""
        if lay.page_size != page_size or lay.rows < 0 or lay.row_bytes < 1 or lay.dim < 0:
            raise Unreadable(f"{self.path}: its recorded layout is not of this file")
        largest = int(self.id_of(np.array([max(lay.rows - 1, 0)]))[0])
        made = layout_for(page_size, lay.first_leaf, lay.row_bytes, lay.dim, largest, lay.rows)
        if made.per_leaf != lay.per_leaf or made.leaves != lay.leaves or made.first_leaf != lay.first_leaf \
                or lay.first_leaf < 2:
            raise Unreadable(f"{self.path}: its recorded layout is not one the merge makes")
        if lay.leaves and lay.leaf_page(lay.leaves - 1) > self.pages:
            raise Unreadable(f"{self.path}: its recorded layout reaches past the file's end")

    def _prove_interior(self, root: int) -> None:
        """The table's root and interior pages are exactly the writer's for this layout."""
        lay, ps = self.layout, self.layout.page_size
        if lay.leaves <= 1:
            if lay.leaves and root != lay.first_leaf:
                raise Unreadable(f"{self.path}: the table's root is not its one leaf")
            return
        keys = self.id_of(np.minimum(np.arange(1, lay.leaves + 1) * lay.per_leaf, lay.rows) - 1)
        pages, count = interior_pages(lay, root, keys)
        if count > self.pages:   # SQLite's small tables may follow
            raise Unreadable(f"{self.path}: {self.pages} pages, the layout needs {count}")
        for page, data in pages:
            if page == lock_page(ps) or not np.array_equal(self.map[(page - 1) * ps:page * ps], data):
                raise Unreadable(f"{self.path}: interior page {page} is not the layout's")

    def _stamp(self) -> bytes:
        return self.map[18:28].tobytes()   # the format versions, ..., the change counter

    def current(self) -> None:
        """Raise :class:`Changed` where the file was written since it was proven (its header's
        versions or change counter, or its size: a map of a file cut short would fault)."""
        if self.map[18:28].tobytes() != self.stamp:
            raise Changed(f"{self.path}: written by another SQLite client while open")
        try:
            size = os.fstat(self.fd).st_size
        except OSError as e:
            raise Changed(f"{self.path}: {e.strerror}") from e
        if size != self.size:
            raise Changed(f"{self.path}: its size changed while open")

    def close(self) -> None:
        super().close()
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def check_leaves(self, leaves: np.ndarray) -> None:
        """Check leaves (indices) whole, as SQLite would read them for any of their rows: the type
        byte, no freeblock, the cell count, the content area's start, every cell pointer where
        the layout puts it, and every cell's payload size, rowid (the id of its place) and
        record header; then mark them checked. :class:`Unreadable` naming the first that differs."""
        leaves = np.asarray(leaves, np.int64)
        step = max(1, CHECK_CELLS // self.layout.per_leaf)   # the index arrays stay a few MiB
        for a in range(0, len(leaves), step):
            self._check(leaves[a:a + step])
        self.checked[leaves] = True

    def _check(self, leaves: np.ndarray) -> None:
        lay, c = self.layout, self.layout.per_leaf
        counts = lay.leaf_rows(leaves)
        first, last = self.id_of(leaves * c), self.id_of(leaves * c + counts - 1)
        length = varint_len(last)
        # nearly every leaf holds consecutive ids of one varint length: its cells are evenly
        # spaced, checked as strided runs; the others (a task's gap, a rowid growing a byte in
        # the leaf) cell by cell
        uniform = (varint_len(first) == length) & (last - first == counts - 1)
        fine = np.ones(len(leaves), bool)
        if uniform.any():
            fine[uniform] = self._uniform(leaves[uniform], counts[uniform], first[uniform], length[uniform])
        if not uniform.all():
            fine[~uniform] = self._cells(leaves[~uniform], counts[~uniform])
        if not fine.all():
            bad = int(leaves[np.argmin(fine)])
            raise Unreadable(f"{self.path}: leaf page {int(lay.leaf_page(bad))} is not as the layout "
                             f"puts rows {bad * c}...{bad * c + int(lay.leaf_rows(np.array([bad]))[0]) - 1}")

    def _head(self, bases: np.ndarray, counts: np.ndarray, tops: np.ndarray, offsets: np.ndarray,
              valid: np.ndarray) -> np.ndarray:
        """Which leaves' headers and cell pointers are as the layout puts them."""
        c = self.layout.per_leaf
        head = self._windows(8)[bases].view(np.uint8).reshape(len(bases), 8).astype(np.int64)
        fine = ((head[:, 0] == LEAF) & (head[:, 1] == 0) & (head[:, 2] == 0) & (head[:, 7] == 0)
                & ((head[:, 3] << 8 | head[:, 4]) == counts) & ((head[:, 5] << 8 | head[:, 6]) == tops % 65536))
        pointers = self._windows(2 * c)[bases + 8].view(">u2").reshape(len(bases), c)
        return fine & np.all((pointers == offsets) | ~valid, axis=1)

    def _uniform(self, leaves: np.ndarray, counts: np.ndarray, first: np.ndarray, length: np.ndarray) -> np.ndarray:
        """Leaves of consecutive ids of one varint length each: runs of them on consecutive pages
        read as one strided view, a byte of every cell at a time (numpy's inner loop over cells)."""
        lay, ps, c = self.layout, self.layout.page_size, self.layout.per_leaf
        lp, pl = len(self.prefix), len(self.payload)
        pages_ = np.asarray(lay.leaf_page(leaves), np.int64)
        bases = (pages_ - 1) * ps
        size = lp + length + lay.payload_size
        tops = ps - counts * size
        nth = np.arange(c)
        fine = self._head(bases, counts, tops, tops[:, None] + size[:, None] * nth, nth < counts[:, None])
        key = np.stack([pages_ - np.arange(len(leaves)), counts, length, fine])
        cuts = np.flatnonzero(np.any(np.diff(key, axis=1) != 0, axis=0)) + 1
        for a, b in zip([0, *cuts.tolist()], [*cuts.tolist(), len(leaves)]):
            if not fine[a]:
                continue
            n, L = int(counts[a]), int(length[a])
            cells = np.ndarray((b - a, n, lp + L + pl), np.uint8, self.map, int(bases[a] + tops[a]),
                               (ps, int(size[a]), 1))
            ok = np.ones((b - a, n), bool)
            for k, v in [*enumerate(self.prefix), *((lp + L + j, v) for j, v in enumerate(self.payload))]:
                ok &= cells[:, :, k] == v
            rowid = np.zeros((b - a, n), np.int64)
            for k in range(L):
                byte = cells[:, :, lp + k]
                ok &= (byte >= 0x80) if k < L - 1 else (byte < 0x80)
                rowid <<= 7
                rowid |= byte & 0x7F
            ok &= rowid == first[a:b, None] + nth[:n]
            fine[a:b] = ok.all(axis=1)
        return fine

    def _cells(self, leaves: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """Any leaves, cell by cell: each cell's place from the lengths of the rowids before it."""
        lay, ps, c = self.layout, self.layout.page_size, self.layout.per_leaf
        lp, pl = len(self.prefix), len(self.payload)
        bases = (np.asarray(lay.leaf_page(leaves), np.int64) - 1) * ps
        valid = np.arange(c) < counts[:, None]
        ids = self.id_of(np.minimum(leaves[:, None] * c + np.arange(c), max(lay.rows - 1, 0)))
        id_len = varint_len(ids)
        sizes = np.where(valid, lp + id_len + lay.payload_size, 0)
        tops = ps - sizes.sum(axis=1)
        fine = self._head(bases, counts, tops, tops[:, None] + np.cumsum(sizes, axis=1) - sizes, valid)
        rest = fine[:, None] & valid
        cells = (bases[:, None] + tops[:, None] + np.cumsum(sizes, axis=1) - sizes)[rest]
        width = lp + 8 + pl   # within the cell: its data is 8 bytes or more
        heads = self._windows(width)[cells].view(np.uint8).reshape(len(cells), width)
        rowid, length = read_varints(heads, lp)
        record = np.take_along_axis(heads, (lp + length)[:, None] + np.arange(pl), axis=1)
        good = ((heads[:, :lp] == self.prefix).all(axis=1) & (rowid == ids[rest]) & (length == id_len[rest])
                & (record == self.payload).all(axis=1))
        cell_leaf = np.repeat(np.arange(len(leaves)), rest.sum(axis=1))
        return fine & (np.bincount(cell_leaf, weights=~good, minlength=len(leaves)) == 0)

    def _windows(self, width: int) -> np.ndarray:
        """Every ``width`` bytes of the file as one item: a gather of them is a memcpy each."""
        return np.ndarray((len(self.map) - width + 1,), np.dtype((np.void, width)), self.map, 0, (1,))

    def rows(self, ks: np.ndarray) -> np.ndarray:
        """The data of rows ``ks`` (ids, in range), as an owned ``(len(ks), row_bytes)`` uint8 array."""
        if self.id_of is not _rows_are_ids:
            raise ValueError("rows() reads a table whose ids are its rows (ids 0 ... rows - 1)")
        ks = np.asarray(ks, dtype=np.int64)
        self.current()
        leaf, nth = np.divmod(ks, self.layout.per_leaf)
        if not self.all_checked and not self.checked[leaf].all():
            self.check_leaves(np.unique(leaf[~self.checked[leaf]]))
            self.all_checked = bool(self.checked.all())
        if len(ks) <= self.chunk:
            return self._rows(ks, leaf, nth)
        out = np.empty((len(ks), self.row_bytes), np.uint8)
        for a in range(0, len(ks), self.chunk):
            b = a + self.chunk
            self._rows(ks[a:b], leaf[a:b], nth[a:b], out[a:b])
        return out

    def _rows(self, k: np.ndarray, leaf: np.ndarray, nth: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        # Where a row's data is, by arithmetic: every leaf served was checked whole, its cells
        # where the layout puts them (and the header is unchanged since). In a full leaf of
        # rowids of one length L, the cells are evenly spaced at the page's end: the n-th one's
        # data is (n - per_leaf) cells of (step + L) bytes from the page's end, plus its own
        # head. Rows of other leaves (the last, short one; one where the rowids grow a byte)
        # read their cell pointers. A minibatch's every numpy call counts: in place.
        lay = self.layout
        length = VARINT_LIMITS.searchsorted(k, "right")   # the rowid's varint, less a byte
        starts = nth - lay.per_leaf
        starts *= length + (self.step + 1)
        starts += length
        base = leaf + (lay.first_leaf - 1)   # the leaf's page, from 0 (Layout.leaf_page, inlined)
        if self.crosses:
            base += base >= self.lock0
        base *= lay.page_size
        starts += base
        starts += self.end
        if self.odd is not None and (odd := self.odd[leaf]).any():
            p = base[odd] >> 1
            p += nth[odd] + 4
            starts[odd] = self.pointers[p] + base[odd] + length[odd] + self.before + 1
        if len(k) > 1 and k[-1] - k[0] == len(k) - 1:   # a span: its leaves are strided runs
            return self.gather(starts, out)
        if out is None:
            return self.windows[starts].view(np.uint8).reshape(len(k), self.row_bytes)
        out.view(self.windows.dtype)[:, 0] = self.windows[starts]
        return out


def prove(path: str | os.PathLike, layout: Layout, root: int, id_of: Callable[[np.ndarray], np.ndarray]) -> None:
    """The merge's check of the file it wrote, before it is published: the header (page count
    and size), the interior pages exactly the layout's (every leaf referenced once, in key
    order, the lock-byte page unused), and every leaf whole (:meth:`PageReader.check_leaves`).
    Raises :class:`Unreadable` naming what differs."""
    reader = PageReader(path, layout, root, id_of=id_of)
    try:
        reader.check_leaves(np.arange(layout.leaves))
    finally:
        reader.close()
