"""A staged shard's rows read from its own b-tree pages by numpy, for the page merge: the file's
header and the whole tree of its ``unitaries`` table checked before a byte is read (``pages.walk``:
no cycle, no shared or free page, no lock-byte page), every cell read checked. A shard is
unidask's own file but it comes from shared storage, where anything may have been put: whatever
is not as expected is :class:`pages.Unreadable`, and the merge reads that shard through SQLite,
which checks it again and says what is wrong.
"""

from __future__ import annotations

import os

import numpy as np

from .pages import Layout, Mapped, Unreadable, read_varints, varint, walk


class TableReader(Mapped):
    """The rows of a rowid table of fixed-size rows (``Layout.payload`` then ``row_bytes`` of data
    each, as unidask's shards hold them) read from the file's b-tree pages by numpy: the interior
    pages walked once for the leaves in key order, then the cells of the leaves that hold a range
    of ids parsed all at once. Any page or cell of another shape is :class:`Unreadable`."""

    def __init__(self, path: str | os.PathLike, root: int, row_bytes: int, dim: int):
        super().__init__(path, row_bytes)
        header = self.header()
        header.plain(path, len(self.map))
        self.page_size, self.pages = header.page_size, header.pages
        lay = Layout(self.page_size, 0, 0, 1, 0, row_bytes, dim)
        self.prefix = np.frombuffer(varint(lay.payload_size), np.uint8)
        self.payload = np.frombuffer(lay.payload, np.uint8)
        try:   # a damaged page reads out of the file, or as nonsense: numpy says so
            self.leaves, _ = walk(self, header, int(root))
            self.first_ids = self._cells(self.leaves, first_only=True)[0]
        except (IndexError, ValueError, TypeError) as e:
            raise Unreadable(f"{path}: {e}") from e
        if len(self.first_ids) > 1 and np.any(np.diff(self.first_ids) <= 0):
            raise Unreadable(f"{path}: leaves out of key order")

    def _cells(self, leaves: np.ndarray, first_only: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """The ids of the cells of ``leaves`` (their first cells only) and where each one's data starts."""
        ps = self.page_size
        bases = (leaves - 1) * ps
        counts = (self.map[bases + 3].astype(np.int64) << 8) | self.map[bases + 4]
        if np.any(counts == 0) or np.any(8 + 2 * counts > ps):
            raise Unreadable(f"{self.path}: a leaf without cells or with too many")
        if first_only:
            ids, id_len = self._heads(bases + self._pointer(bases, 0), bases)
            return ids, bases + self._pointer(bases, 0) + len(self.prefix) + id_len + len(self.payload)
        offsets = np.concatenate(([0], np.cumsum(counts)))
        ids, at = np.empty(offsets[-1], np.int64), np.empty(offsets[-1], np.int64)
        rest = ~self._regular(leaves, bases, counts, offsets, ids, at)
        if rest.any():   # cell by cell
            page = np.repeat(np.flatnonzero(rest), counts[rest])
            first = offsets[:-1][rest]
            nth = np.arange(len(page)) - np.repeat(np.cumsum(counts[rest]) - counts[rest], counts[rest])
            cell = bases[page] + self._pointer(bases[page], nth)
            where = np.repeat(first, counts[rest]) + nth
            ids[where], id_len = self._heads(cell, bases[page])
            at[where] = cell + len(self.prefix) + id_len + len(self.payload)
        return ids, at

    def _pointer(self, bases: np.ndarray, nth: np.ndarray | int) -> np.ndarray:
        """The ``nth`` cell pointer of each leaf at ``bases`` (an offset in its page)."""
        at = bases + 8 + 2 * nth
        return (self.map[at].astype(np.int64) << 8) | self.map[at + 1]

    def _regular(self, leaves: np.ndarray, bases: np.ndarray, counts: np.ndarray, offsets: np.ndarray,
                 ids: np.ndarray, at: np.ndarray) -> np.ndarray:
        """The cells of leaves as SQLite lays them when rows are appended or a page rebuilt: of
        one size, each just below the one before. Runs of consecutive such pages of one shape are
        read as one strided view each, every cell checked as :meth:`_heads` does. Fills ``ids``
        and ``at`` (from ``offsets``) for those leaves; returns which they are."""
        ps, lp, pl = self.page_size, len(self.prefix), len(self.payload)
        first, last = self._pointer(bases, 0), self._pointer(bases, counts - 1)
        _, length = self._heads(bases + first, bases)
        _, last_length = self._heads(bases + last, bases)
        size = lp + length + pl + self.row_bytes
        shaped = ((length == last_length) & (counts >= 2) & (first - last == size * (counts - 1))
                  & (first + size <= ps) & (last >= 8 + 2 * counts))
        key = np.stack([leaves - np.arange(len(leaves)), counts, first, length, shaped])
        cuts = np.flatnonzero(np.any(np.diff(key, axis=1) != 0, axis=0)) + 1
        regular = np.zeros(len(leaves), bool)
        for a, b in zip([0, *cuts], [*cuts, len(leaves)]):
            if not shaped[a]:
                continue
            n, p0, L, s = int(counts[a]), int(first[a]), int(length[a]), int(size[a])
            pointers = np.ndarray((b - a, n), ">u2", self.map, bases[a] + 8, (ps, 2))
            cells = np.ndarray((b - a, n, lp + L + pl), np.uint8, self.map, bases[a] + p0, (ps, -s, 1))
            # a byte of every cell at a time: numpy's inner loop then runs over the cells
            expect = [*self.prefix, *[None] * L, *self.payload]
            if not (np.array_equal(pointers, np.broadcast_to(p0 - s * np.arange(n), pointers.shape))
                    and all((cells[:, :, k] == v).all() for k, v in enumerate(expect) if v is not None)
                    and all((cells[:, :, k] >= 0x80).all() for k in range(lp, lp + L - 1))
                    and (cells[:, :, lp + L - 1] < 0x80).all()):
                continue   # cell by cell, which says what is wrong
            value = np.zeros((b - a, n), np.int64)
            for k in range(L):
                value = value << 7 | (cells[:, :, lp + k] & 0x7F)
            ids[offsets[a]:offsets[b]] = value.ravel()
            at[offsets[a]:offsets[b]] = (bases[a:b, None] + p0 + lp + L + pl - s * np.arange(n)).ravel()
            regular[a:b] = True
        return regular

    def _heads(self, cell: np.ndarray, page_base: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The id of each cell at file offset ``cell`` (in the page at ``page_base``) and the
        length of its varint, every cell checked: the payload size, an id, the record header and
        the dim, and its data within the page."""
        ps, lp, pl = self.page_size, len(self.prefix), len(self.payload)
        # each cell's head in one gather, as wide as with the longest id: within a cell of the
        # shape, as its data is 8 bytes or more
        width = lp + 8 + pl
        if np.any(cell + width > page_base + ps):
            raise Unreadable(f"{self.path}: a cell out of its page")
        heads = np.ndarray((len(self.map) - width + 1,), np.dtype((np.void, width)), self.map, 0, (1,))
        head = heads[cell].view(np.uint8).reshape(len(cell), width)
        if not np.array_equal(head[:, :lp], np.broadcast_to(self.prefix, (len(cell), lp))):
            raise Unreadable(f"{self.path}: a row of another size")
        try:
            ids, id_len = read_varints(head, lp)
        except Unreadable as e:
            raise Unreadable(f"{self.path}: {e}") from e
        if np.any(cell + lp + id_len + pl + self.row_bytes > page_base + ps):
            raise Unreadable(f"{self.path}: a cell out of its page, or an overflow chain")
        record = np.take_along_axis(head, (lp + id_len)[:, None] + np.arange(pl), axis=1)
        if not np.array_equal(record, np.broadcast_to(self.payload, record.shape)):
            raise Unreadable(f"{self.path}: a row of another shape (meta, dim or type)")
        return ids, id_len

    def rows(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """The ids in ``start ... stop - 1`` the table holds, increasing, and their data: an
        ``(N, row_bytes)`` uint8 array of its own."""
        ids, at, lo, hi = self.cells_in(np.array([start]), np.array([stop]))
        return ids[lo[0]:hi[0]], self.gather(at[lo[0]:hi[0]])

    def cells_in(self, starts: np.ndarray, stops: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The cells of the leaves that hold ids in any of the ranges ``starts[i] ... stops[i] - 1``
        (increasing, disjoint): their ids (increasing), where each one's data starts in the file,
        and where each range's cells begin and end among them. Every leaf is parsed once, in one go."""
        starts, stops = np.asarray(starts, np.int64), np.asarray(stops, np.int64)
        lo = np.maximum(np.searchsorted(self.first_ids, starts, "right") - 1, 0)
        hi = np.maximum(np.searchsorted(self.first_ids, stops, "left"), lo)
        cover = np.zeros(len(self.leaves) + 1, np.int64)   # the union of the ranges' leaves
        np.add.at(cover, lo, 1)
        np.add.at(cover, hi, -1)
        leaves = self.leaves[np.cumsum(cover)[:-1] > 0]
        if not len(leaves):
            empty = np.zeros(len(starts), np.int64)
            return np.zeros(0, np.int64), np.zeros(0, np.int64), empty, empty
        try:
            ids, at = self._cells(leaves)
        except (IndexError, ValueError) as e:
            raise Unreadable(f"{self.path}: {e}") from e
        if len(ids) > 1 and np.any(np.diff(ids) <= 0):
            raise Unreadable(f"{self.path}: ids out of order")
        return ids, at, np.searchsorted(ids, starts), np.searchsorted(ids, stops)
