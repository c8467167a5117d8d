"""The merged database's ``unitaries`` table written as SQLite's own b-tree pages, by numpy, in a
layout unidask defines: rows in id order, a fixed number of rows per leaf page, the leaves in id
order from one page on, then the interior pages. SQLite's file format (sqlite.org/fileformat2.html,
stable since 2004) is what ``sqlite3`` reads: the file is a normal database, and the layout is only
what makes a row's place computable (``Layout``).

SQLite makes the file, its schema and its small tables (meta, tasks) and an empty ``unitaries``
table; the writer appends the table's leaves after the file's last page, its interior pages after
those, writes the top page over the table's root page, and sets the header's page count.

Rows of fixed size without meta only, whose record fits in a page (no overflow chain): complex128
up to n = 63 at 64 KiB pages. Others are merged by SQLite (``merge.py``).
"""

from __future__ import annotations

import os
import struct
from dataclasses import asdict, dataclass

import numpy as np

LEAF, INTERIOR = 0x0D, 0x05
HEADER_PAGES = 28          # the database header's page count (big-endian u32)
HEADER_COUNTER = 24        # its file change counter, and the version it is valid for:
HEADER_VALID_FOR = 92      # the page count is trusted only where the two are equal


VARINT_LIMITS = np.array([1 << (7 * k) for k in range(1, 8)], np.int64)   # where a varint grows a byte


def varint_len(values: np.ndarray) -> np.ndarray:
    """Bytes of SQLite's varint of each value (0 <= value < 2^56: at most 8 bytes, 7 bits each)."""
    return np.searchsorted(VARINT_LIMITS, np.asarray(values, np.int64), "right") + 1


def varints(values: np.ndarray, length: int) -> np.ndarray:
    """Each value's SQLite varint of ``length`` bytes (all of that length): an (N, length) array."""
    v = np.asarray(values, dtype=np.uint64)[:, None]
    shifts = np.uint64(7) * np.arange(length - 1, -1, -1, dtype=np.uint64)
    out = ((v >> shifts) & np.uint64(0x7F)).astype(np.uint8)
    out[:, :-1] |= 0x80
    return out


def varint(value: int) -> bytes:
    """SQLite's varint of one value (0 <= value < 2^56)."""
    out = [value & 0x7F]
    value >>= 7
    while value:
        out.append(0x80 | (value & 0x7F))
        value >>= 7
    return bytes(reversed(out))


@dataclass(frozen=True)
class Layout:
    """Where each row is: the ``k``-th row (in id order) in leaf page ``first_leaf + k // per_leaf``
    (1-based page numbers, of ``page_size`` bytes), its data ``row_bytes`` long. A cell is the
    payload size, the rowid, the record header, the dim and the data; only the rowid's length
    varies (with the id), so a leaf's cells are placed from the page's end back."""

    page_size: int
    first_leaf: int
    leaves: int
    per_leaf: int
    rows: int
    row_bytes: int
    dim: int

    @property
    def record_header(self) -> bytes:
        # header size, then the serial types: id (the rowid: NULL), dim (an int), data (a BLOB), meta (NULL)
        types = b"\x00" + bytes([_int_type(self.dim)]) + varint(2 * self.row_bytes + 12) + b"\x00"
        return bytes([len(types) + 1]) + types

    @property
    def payload(self) -> bytes:
        """A record's bytes before its data."""
        return self.record_header + _int_bytes(self.dim)

    @property
    def payload_size(self) -> int:
        return len(self.payload) + self.row_bytes

    def cell_size(self, id_len: int) -> int:
        return len(varint(self.payload_size)) + id_len + self.payload_size

    def to_meta(self) -> dict[str, str]:
        return {f"layout.{k}": str(v) for k, v in asdict(self).items()}


def _int_type(value: int) -> int:
    # SQLite's serial type of a small integer: 8 and 9 are the constants 0 and 1 (no bytes)
    return 8 if value == 0 else 9 if value == 1 else 1 if -128 <= value < 128 else 2


def _int_bytes(value: int) -> bytes:
    t = _int_type(value)
    return b"" if t in (8, 9) else value.to_bytes(1 if t == 1 else 2, "big", signed=True)


def fits(row_bytes: int, page_size: int) -> bool:
    """Whether a row's record fits in a leaf page's cell without an overflow page (SQLite's
    largest local payload of a table leaf is the usable size less 35)."""
    return row_bytes + 16 <= page_size - 35


def per_leaf(page_size: int, cell_size: int) -> int:
    """Cells of ``cell_size`` bytes (the largest of the file's) that fit in one leaf page."""
    return (page_size - 8) // (cell_size + 2)


def layout_for(page_size: int, first_leaf: int, row_bytes: int, dim: int, largest_id: int, rows: int = 0) -> Layout:
    """The layout of ``rows`` rows whose ids are at most ``largest_id``: as many cells a leaf as
    the longest (the largest id's) fit."""
    if not fits(row_bytes, page_size):
        raise ValueError(f"a row of {row_bytes} bytes does not fit in a {page_size}-byte page")
    probe = Layout(page_size, first_leaf, 0, 1, 0, row_bytes, dim)
    c = per_leaf(page_size, probe.cell_size(len(varint(largest_id))))
    return Layout(page_size, first_leaf, -(-rows // c), c, rows, row_bytes, dim)


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
        os.pwrite(self.fd, pages, (lay.first_leaf - 1 + first_row // c) * lay.page_size)

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
        top = self.layout.page_size - int(sizes.sum())
        offsets = top + np.concatenate(([0], np.cumsum(sizes)[:-1]))
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
    next_page = lay.first_leaf + lay.leaves
    level = list(zip(range(lay.first_leaf, next_page), keys.tolist()))
    if not level:   # no row: the root stays SQLite's empty leaf
        _set_page_count(fd, lay.first_leaf - 1)
        os.ftruncate(fd, (lay.first_leaf - 1) * lay.page_size)
        return Layout(**{**asdict(lay), "leaves": 0, "rows": 0})
    fanout = (lay.page_size - 12) // (2 + 4 + 9)
    while len(level) > 1:
        groups = -(-len(level) // fanout)
        bounds = np.linspace(0, len(level), groups + 1).round().astype(int)   # even: none nearly empty
        parents = []
        for g in range(groups):
            children = level[bounds[g]:bounds[g + 1]]
            page = next_page if groups > 1 else root
            os.pwrite(fd, _interior(children, lay.page_size), (page - 1) * lay.page_size)
            if groups > 1:
                next_page += 1
            parents.append((page, children[-1][1]))
        level = parents
    if level[0][0] != root:   # a single leaf: it is the root itself
        only = os.pread(fd, lay.page_size, (level[0][0] - 1) * lay.page_size)
        os.pwrite(fd, only, (root - 1) * lay.page_size)
        next_page -= 1
        lay = Layout(**{**asdict(lay), "first_leaf": root})
    _set_page_count(fd, next_page - 1)
    os.ftruncate(fd, (next_page - 1) * lay.page_size)
    return lay


def _set_page_count(fd: int, pages: int) -> None:
    header = bytearray(os.pread(fd, 100, 0))
    counter = struct.unpack(">I", header[HEADER_COUNTER:HEADER_COUNTER + 4])[0] + 1
    header[HEADER_PAGES:HEADER_PAGES + 4] = struct.pack(">I", pages)
    header[HEADER_COUNTER:HEADER_COUNTER + 4] = struct.pack(">I", counter)
    header[HEADER_VALID_FOR:HEADER_VALID_FOR + 4] = struct.pack(">I", counter)
    os.pwrite(fd, bytes(header), 0)


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


def change_counter(path: str | os.PathLike) -> int:
    """The file change counter in the database header of ``path``."""
    with open(path, "rb") as f:
        f.seek(HEADER_COUNTER)
        return struct.unpack(">I", f.read(4))[0]


def read_layout(path: str | os.PathLike, meta: dict[str, str]) -> Layout | None:
    """The layout ``meta`` records, where the file at ``path`` is still exactly as the merge left
    it (its header's change counter, page size and page count as recorded; a rollback journal)
    and its ids run from 0 without a gap; else None (read it through SQL)."""
    try:
        layout = Layout(**{k: int(meta[f"layout.{k}"]) for k in Layout.__dataclass_fields__})
        counter, dense = int(meta["layout.change_counter"]), meta["layout.dense"] == "1"
        with open(path, "rb") as f:
            header = f.read(100)
            size = os.fstat(f.fileno()).st_size
    except (KeyError, ValueError, TypeError, OSError):
        return None
    if len(header) < 100 or not dense:
        return None
    page_size = struct.unpack(">H", header[16:18])[0] or 65536
    page_size = 65536 if page_size == 1 else page_size
    same = (page_size == layout.page_size and header[18:20] == b"\x01\x01"
            and struct.unpack(">I", header[HEADER_COUNTER:HEADER_COUNTER + 4])[0] == counter
            and struct.unpack(">I", header[HEADER_VALID_FOR:HEADER_VALID_FOR + 4])[0] == counter
            and struct.unpack(">I", header[HEADER_PAGES:HEADER_PAGES + 4])[0] * page_size == size
            and layout.leaves * layout.per_leaf >= layout.rows and header[20] == 0)
    return layout if same else None


class Unreadable(Exception):
    """A page or a cell that is not as :class:`TableReader` expects (another shape of row, an
    overflow chain, a WAL file, damage): read those rows through SQL, which says what is wrong."""


class _Mapped:
    """A file mapped read-only, and its rows of ``row_bytes`` bytes gathered from any offsets."""

    def __init__(self, path: str | os.PathLike, row_bytes: int):
        self.path, self.row_bytes = path, row_bytes
        try:
            self.map = np.memmap(path, np.uint8, "r").view(np.ndarray)   # memmap's own indexing is slow
        except (OSError, ValueError) as e:
            raise Unreadable(f"cannot map {path}: {e}") from e
        # every window of row_bytes bytes of the file as one item: a gather is a memcpy a row
        self.windows = np.ndarray((max(len(self.map) - row_bytes + 1, 0),), np.dtype((np.void, row_bytes)),
                                  self.map, 0, (1,))

    RUN = 16   # rows evenly spaced in the file from which a strided copy beats a gather

    def gather(self, starts: np.ndarray, out: np.ndarray | None = None, into: np.ndarray | None = None) -> np.ndarray:
        """The rows starting at the file's offsets ``starts``: an ``(N, row_bytes)`` uint8 array of
        its own, or written into ``out`` (such an array, contiguous rows), at its rows ``into``
        (by default the first N). Runs of rows evenly spaced in the file and consecutive in
        ``out`` (a leaf's cells) are copied as strided views, which lets go of the GIL; the
        others are gathered as one item each, a memcpy a row."""
        starts = np.asarray(starts, np.int64)
        if out is None:
            out = np.empty((len(starts), self.row_bytes), np.uint8)
        into = np.arange(len(starts)) if into is None else np.asarray(into, np.int64)
        if len(starts) < self.RUN:
            out.view(self.windows.dtype)[into, 0] = self.windows[starts]
            return out
        # a run: a longest stretch of one step between neighbours in the file, and of one row in out
        step = np.diff(starts)
        bounds = np.concatenate(([0], np.flatnonzero(step[1:] != step[:-1]) + 2,
                                 np.flatnonzero(np.diff(into) != 1) + 1, [len(starts)]))
        bounds = np.unique(np.minimum(bounds, len(starts)))
        lengths = np.diff(bounds)
        long = lengths >= self.RUN
        for a, b in zip(bounds[:-1][long].tolist(), bounds[1:][long].tolist()):
            row = int(into[a])
            out[row:row + b - a] = np.ndarray((b - a, self.row_bytes), np.uint8, self.map, starts[a], (step[a], 1))
        if not long.all():
            rest = np.repeat(~long, lengths)
            out.view(self.windows.dtype)[into[rest], 0] = self.windows[starts[rest]]
        return out

    def close(self) -> None:
        self.windows = self.map = None


class PageReader(_Mapped):
    """The rows of a database in the merge's layout (:func:`read_layout`: ids 0 ... rows - 1),
    read from a memory map of the file at offsets computed from the layout and each leaf's cell
    pointers: no SQL, no Python object per row."""

    def __init__(self, path: str | os.PathLike, layout: Layout):
        super().__init__(path, layout.row_bytes)
        self.layout = layout
        self.prefix = len(varint(layout.payload_size))   # the payload size, before the rowid
        self.before = len(layout.payload)   # record header and dim, before the data
        self.chunk = max(1, (1 << 20) // max(1, layout.row_bytes))
        self.pointers = self.map[:len(self.map) // 2 * 2].view(">u2")   # at even offsets, as cell pointers are

    def rows(self, ks: np.ndarray) -> np.ndarray:
        """The data of rows ``ks`` (ids, in range), as an owned ``(len(ks), row_bytes)`` uint8 array."""
        ks = np.asarray(ks, dtype=np.int64)
        if len(ks) <= self.chunk:
            return self._rows(ks)
        out = np.empty((len(ks), self.row_bytes), np.uint8)
        for a in range(0, len(ks), self.chunk):
            self._rows(ks[a:a + self.chunk], out[a:a + self.chunk])
        return out

    def _rows(self, k: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        # a minibatch's every numpy call counts: in place where it can be
        lay = self.layout
        leaf, nth = np.divmod(k, lay.per_leaf)
        base = leaf * lay.page_size
        pointer = base >> 1   # the cell pointer's index in the 2-byte view: at 8 + 2 * nth in the leaf
        pointer += nth
        pointer += (lay.first_leaf - 1) * lay.page_size // 2 + 4
        starts = self.pointers[pointer].astype(np.int64)
        starts += base
        starts += VARINT_LIMITS.searchsorted(k, "right")   # the rowid's varint, less a byte
        starts += (lay.first_leaf - 1) * lay.page_size + self.prefix + self.before + 1
        if len(k) > 1 and k[-1] - k[0] == len(k) - 1:   # a span: its leaves are strided runs
            return self.gather(starts, out)
        if out is None:
            return self.windows[starts].view(np.uint8).reshape(len(k), self.row_bytes)
        out.view(self.windows.dtype)[:, 0] = self.windows[starts]
        return out


class TableReader(_Mapped):
    """The rows of a rowid table of fixed-size rows (``Layout.payload`` then ``row_bytes`` of data
    each, as unidask's shards hold them) read from the file's b-tree pages by numpy: the interior
    pages walked once for the leaves in key order, then the cells of the leaves that hold a range
    of ids parsed all at once. Any page or cell of another shape is :class:`Unreadable`."""

    def __init__(self, path: str | os.PathLike, root: int, row_bytes: int, dim: int):
        super().__init__(path, row_bytes)
        header = bytes(self.map[:100])
        size = int.from_bytes(header[16:18], "big")
        self.page_size = 65536 if size == 1 else size
        # a rollback-journal file (not WAL: its rows may be in the -wal file), no reserved bytes
        if len(header) < 100 or header[:16] != b"SQLite format 3\0" or header[18:21] != b"\x01\x01\x00":
            raise Unreadable(f"{path}: not a rollback-journal database without reserved bytes")
        self.pages = len(self.map) // self.page_size
        lay = Layout(self.page_size, 0, 0, 1, 0, row_bytes, dim)
        self.prefix = np.frombuffer(varint(lay.payload_size), np.uint8)
        self.payload = np.frombuffer(lay.payload, np.uint8)
        try:   # a damaged page reads out of the file, or as nonsense: numpy says so
            self.leaves = self._walk(int(root))
            self.first_ids = self._cells(self.leaves, first_only=True)[0]
        except (IndexError, ValueError, TypeError) as e:
            raise Unreadable(f"{path}: {e}") from e
        if len(self.first_ids) > 1 and np.any(np.diff(self.first_ids) <= 0):
            raise Unreadable(f"{path}: leaves out of key order")

    def _walk(self, root: int) -> np.ndarray:
        level, depth = np.array([root], np.int64), 0
        while True:
            if np.any((level < 2) | (level > self.pages)) or depth > 20:
                raise Unreadable(f"{self.path}: a child page out of the file")
            kinds = self.map[(level - 1) * self.page_size]
            if np.all(kinds == LEAF):
                return level
            if np.any(kinds != INTERIOR):
                raise Unreadable(f"{self.path}: a page of the table is neither a leaf nor an interior page")
            children = []
            for page in level.tolist():
                base = (page - 1) * self.page_size
                n = int(self.map[base + 3]) << 8 | int(self.map[base + 4])
                if 12 + 2 * n > self.page_size:
                    raise Unreadable(f"{self.path}: page {page} has too many cells")
                pointers = self.map[base + 12:base + 12 + 2 * n].view(">u2").astype(np.int64) + base
                if np.any(pointers + 4 > base + self.page_size):
                    raise Unreadable(f"{self.path}: page {page} has a cell out of the page")
                cells = self.map[pointers[:, None] + np.arange(4)].view(">u4")[:, 0].astype(np.int64)
                children += [cells, self.map[base + 8:base + 12].view(">u4").astype(np.int64)]
            level, depth = np.concatenate(children), depth + 1

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
        more = head[:, lp:lp + 8] >= 0x80   # a varint's bytes but its last have the high bit
        if np.any(more.all(axis=1)):
            raise Unreadable(f"{self.path}: an id of 2^56 or more")
        id_len = np.argmin(more, axis=1) + 1
        ids = np.zeros(len(cell), np.int64)
        for k in range(8):
            ids = np.where(k < id_len, ids << 7 | (head[:, lp + k] & 0x7F), ids)
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
