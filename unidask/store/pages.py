"""SQLite's file format (sqlite.org/fileformat2.html), as far as unidask's page writer
(``pagewrite.py``) and its two page readers (``shardread.py``, ``pageread.py``) rely on it: the
database header, page sizes, the lock-byte page, varints, the b-tree pages of a rowid table, and
the ``Layout`` the page merge lays a table out in. README's "The database format" lists each
rule with the test that holds it.

Everything a reader takes from a file is checked here before it is used: a number the file states
about itself (its page count, its change counter) says where to look, never that what is there
is sound.
"""

from __future__ import annotations

import os
import struct
from dataclasses import asdict, dataclass

import numpy as np

MAGIC = b"SQLite format 3\0"
LEAF, INTERIOR = 0x0D, 0x05          # table b-tree page types (the index types are 0x0A, 0x02)
HEADER_COUNTER = 24                  # the file change counter (big-endian u32)
HEADER_PAGES = 28                    # the database size in pages, valid only where
HEADER_VALID_FOR = 92                # the version-valid-for number equals the change counter
LOCK_BYTE = 1 << 30                  # the lock-byte page holds this offset; no b-tree may use it
MAX_DEPTH = 20                       # SQLite's own bound on a b-tree's depth (BTCURSOR_MAX_DEPTH)


class Unreadable(Exception):
    """A file, page or cell that is not as a page reader expects (another shape of row, an
    overflow chain, a WAL file, damage, a crafted structure): those rows are read through SQL,
    which says what is wrong."""


def lock_page(page_size: int) -> int:
    """The 1-based number of the lock-byte page at ``page_size``: the page that holds byte 2^30."""
    return LOCK_BYTE // page_size + 1


def valid_page_size(size: int) -> bool:
    return 512 <= size <= 65536 and size & (size - 1) == 0


@dataclass(frozen=True)
class Header:
    """The database header's fields a page reader depends on (fileformat2 section 1.3)."""

    page_size: int
    write_version: int
    read_version: int
    reserved: int
    payload_fractions: bytes
    change_counter: int
    pages: int
    freelist_trunk: int
    freelist_pages: int
    largest_root: int        # non-zero: auto_vacuum, the file has pointer-map pages
    valid_for: int

    @classmethod
    def parse(cls, raw: bytes, path: str | os.PathLike = "") -> "Header":
        if len(raw) < 100 or raw[:16] != MAGIC:
            raise Unreadable(f"{path}: not an SQLite database (no header)")
        size = struct.unpack(">H", raw[16:18])[0]
        size = 65536 if size == 1 else size
        if not valid_page_size(size):
            raise Unreadable(f"{path}: page size {size} is not a power of two from 512 to 65536")
        u32 = lambda at: struct.unpack(">I", raw[at:at + 4])[0]   # noqa: E731
        return cls(size, raw[18], raw[19], raw[20], bytes(raw[21:24]), u32(HEADER_COUNTER), u32(HEADER_PAGES),
                   u32(32), u32(36), u32(52), u32(HEADER_VALID_FOR))

    def plain(self, path: str | os.PathLike, file_size: int) -> None:
        """Raise :class:`Unreadable` unless the file is one a page reader may read by itself: a
        rollback journal (a WAL file's rows may be in its ``-wal``), no reserved bytes, the
        payload fractions SQLite requires, no auto_vacuum (no pointer-map pages among the
        tree's), and a page count that is valid, of whole pages, and the file's size."""
        if (self.write_version, self.read_version) != (1, 1):
            raise Unreadable(f"{path}: not a rollback-journal database (WAL, or a newer format)")
        if self.reserved:
            raise Unreadable(f"{path}: {self.reserved} reserved bytes a page")
        if self.payload_fractions != b"\x40\x20\x20":
            raise Unreadable(f"{path}: payload fractions other than SQLite's 64/32/32")
        if self.largest_root:
            raise Unreadable(f"{path}: auto_vacuum (pointer-map pages)")
        if self.valid_for != self.change_counter:
            raise Unreadable(f"{path}: its header's page count is not valid (written by an old SQLite)")
        if file_size % self.page_size or self.pages * self.page_size != file_size or self.pages < 1:
            raise Unreadable(f"{path}: {file_size} bytes is not the {self.pages} pages of "
                             f"{self.page_size} bytes its header states (truncated, or grown)")


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


def read_varints(heads: np.ndarray, at: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The varints at column ``at`` of each row of ``heads`` (an (N, width) uint8 array, width >=
    at + 8) that are under 2^56 (at most 8 bytes): their values and lengths. A longer one (a
    rowid unidask never writes) is :class:`Unreadable`."""
    more = heads[:, at:at + 8] >= 0x80   # a varint's bytes but its last have the high bit
    if np.any(more.all(axis=1)):
        raise Unreadable("a varint of 2^56 or more")
    length = np.argmin(more, axis=1) + 1
    value = np.zeros(len(heads), np.int64)
    for k in range(8):
        value = np.where(k < length, value << 7 | (heads[:, at + k] & 0x7F), value)
    return value, length


@dataclass(frozen=True)
class Layout:
    """Where each row is: the ``k``-th row (in id order) in the ``k // per_leaf``-th leaf, leaves
    on consecutive pages from ``first_leaf`` (1-based page numbers of ``page_size`` bytes) but for
    the lock-byte page, which is skipped; its data ``row_bytes`` long. A cell is the payload
    size, the rowid, the record header, the dim and the data; only the rowid's length varies
    (with the id), so a leaf's cells are placed from the page's end back."""

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

    def leaf_page(self, leaf: np.ndarray | int) -> np.ndarray | int:
        """The page number of each ``leaf`` (0-based leaf index): the lock-byte page skipped."""
        lock = lock_page(self.page_size)
        page = self.first_leaf + leaf
        return page + ((page >= lock) & (self.first_leaf < lock))

    @property
    def end(self) -> int:
        """The first page after the leaves."""
        return int(self.leaf_page(self.leaves - 1)) + 1 if self.leaves else self.first_leaf

    def leaf_rows(self, leaf: np.ndarray) -> np.ndarray:
        """How many rows each leaf holds: ``per_leaf``, the last one the rest."""
        return np.minimum(self.rows - np.asarray(leaf, np.int64) * self.per_leaf, self.per_leaf)

    def to_meta(self) -> dict[str, str]:
        return {f"layout.{k}": str(v) for k, v in asdict(self).items()}

    @classmethod
    def from_meta(cls, meta: dict[str, str]) -> "Layout | None":
        """The layout ``meta`` records (a hint: a page reader proves it against the file), or None."""
        try:
            return cls(**{k: int(meta[f"layout.{k}"]) for k in cls.__dataclass_fields__})
        except (KeyError, ValueError, TypeError):
            return None


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
    the longest (the largest id's) fit; never a leaf on the lock-byte page."""
    if not fits(row_bytes, page_size):
        raise ValueError(f"a row of {row_bytes} bytes does not fit in a {page_size}-byte page")
    first_leaf += first_leaf == lock_page(page_size)
    probe = Layout(page_size, first_leaf, 0, 1, 0, row_bytes, dim)
    c = per_leaf(page_size, probe.cell_size(len(varint(largest_id))))
    return Layout(page_size, first_leaf, -(-rows // c), c, rows, row_bytes, dim)


def leaf_offsets(layout: Layout, ids: np.ndarray) -> tuple[np.ndarray, int]:
    """Where each cell of a leaf holding ``ids`` (increasing) begins in its page, and where the
    cell content area begins: the cells from the page's end back, the first id's highest."""
    sizes = len(varint(layout.payload_size)) + varint_len(ids) + layout.payload_size
    top = layout.page_size - int(sizes.sum())
    return top + np.concatenate(([0], np.cumsum(sizes)[:-1])), top


class Mapped:
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

    def header(self) -> Header:
        return Header.parse(bytes(self.map[:100]), self.path)

    def u16(self, at: np.ndarray) -> np.ndarray:
        """The big-endian 2-byte numbers at file offsets ``at``."""
        return (self.map[at].astype(np.int64) << 8) | self.map[at + 1]

    def close(self) -> None:
        self.windows = self.map = None


def walk(mapped: Mapped, header: Header, root: int) -> tuple[np.ndarray, np.ndarray]:
    """A table b-tree's leaves in key order, from ``root``, every interior page checked first:
    its type, its cell count and cell pointers inside the page, each child a page of the file
    that is not page 1, the lock-byte page, a freelist page or a page already reached (no cycle,
    no shared child), at most :data:`MAX_DEPTH` levels. Returns the leaves' page numbers and,
    for each leaf but the last, the key its parent gives it (the largest id it may hold).
    Bounded by the file's pages: a crafted tree is :class:`Unreadable`, never a long walk."""
    ps, path, n_pages = header.page_size, mapped.path, header.pages
    seen = np.zeros(n_pages + 1, bool)
    seen[[0, 1]] = True
    lock = lock_page(ps)
    if lock <= n_pages:
        seen[lock] = True
    seen[freelist(mapped, header)] = True
    level, bounds = np.array([root], np.int64), np.array([np.iinfo(np.int64).max])
    for _ in range(MAX_DEPTH):
        if np.any((level < 2) | (level > n_pages)):
            raise Unreadable(f"{path}: a child page out of the file")
        if np.any(seen[level]) or len(np.unique(level)) != len(level):
            raise Unreadable(f"{path}: a page reached twice, the lock-byte page or a free page in the tree")
        seen[level] = True
        bases = (level - 1) * ps
        kinds = mapped.map[bases]
        if np.all(kinds == LEAF):
            return level, bounds[:-1]
        if np.any(kinds != INTERIOR):
            raise Unreadable(f"{path}: a page of the table is neither a leaf nor an interior page")
        counts = mapped.u16(bases + 3)
        if np.any(12 + 2 * counts > ps):
            raise Unreadable(f"{path}: an interior page with more cells than fit")
        page = np.repeat(np.arange(len(level)), counts)
        nth = np.arange(len(page)) - np.repeat(np.cumsum(counts) - counts, counts)
        pointers = mapped.u16(bases[page] + 12 + 2 * nth)
        if np.any((pointers < 12 + 2 * counts[page]) | (pointers + 5 > ps)):
            raise Unreadable(f"{path}: an interior cell out of its page")
        cells = bases[page] + pointers
        # a cell: the child's page number, then the key's varint (read 8 bytes wide, then held
        # to its page)
        heads = mapped.map[np.minimum(cells[:, None] + np.arange(12), len(mapped.map) - 1)]
        children = heads[:, :4].astype(np.int64) @ np.array([1 << 24, 1 << 16, 1 << 8, 1], np.int64)
        keys, length = read_varints(heads, 4)
        if np.any(pointers + 4 + length > ps):
            raise Unreadable(f"{path}: an interior cell out of its page")
        right = mapped.map[bases[:, None] + np.arange(8, 12)].astype(np.int64) @ \
            np.array([1 << 24, 1 << 16, 1 << 8, 1], np.int64)
        # the next level in key order: each page's cells' children, then its right-most child,
        # which inherits the page's own bound
        ends = np.cumsum(counts + 1) - 1
        nxt, nxt_bounds = np.empty(ends[-1] + 1, np.int64), np.empty(ends[-1] + 1, np.int64)
        at = ends[page] - counts[page] + nth
        nxt[at], nxt_bounds[at] = children, keys
        nxt[ends], nxt_bounds[ends] = right, bounds
        if np.any(np.diff(nxt_bounds) <= 0):
            raise Unreadable(f"{path}: interior keys out of order")
        level, bounds = nxt, nxt_bounds
    raise Unreadable(f"{path}: a b-tree deeper than {MAX_DEPTH} levels")


def freelist(mapped: Mapped, header: Header) -> np.ndarray:
    """The pages on the freelist (trunk and leaf pages), the trunk chain walked no further than
    the count the header states and the file's pages allow."""
    ps, out, trunk = header.page_size, [], header.freelist_trunk
    budget = min(header.freelist_pages, header.pages)
    while trunk and budget > 0:
        if not 2 <= trunk <= header.pages:
            raise Unreadable(f"{mapped.path}: a freelist trunk page out of the file")
        base = (trunk - 1) * ps
        raw = mapped.map[base:base + 8].tobytes()
        nxt, n = struct.unpack(">II", raw)
        if n > (ps - 8) // 4 or n + 1 > budget:
            raise Unreadable(f"{mapped.path}: a freelist trunk page of {n} leaves")
        leaves = mapped.map[base + 8:base + 8 + 4 * n].view(">u4").astype(np.int64)
        if np.any((leaves < 2) | (leaves > header.pages)):
            raise Unreadable(f"{mapped.path}: a freelist page out of the file")
        out += [np.array([trunk]), leaves]
        budget -= n + 1
        trunk = nxt
    if trunk:
        raise Unreadable(f"{mapped.path}: a freelist longer than the header states")
    pages = np.concatenate(out) if out else np.zeros(0, np.int64)
    if len(np.unique(pages)) != len(pages):
        raise Unreadable(f"{mapped.path}: a page on the freelist twice")
    return pages


def change_counter(path: str | os.PathLike) -> int:
    """The file change counter in the database header of ``path``."""
    with open(path, "rb") as f:
        f.seek(HEADER_COUNTER)
        return struct.unpack(">I", f.read(4))[0]
