"""Files on disk: one atomic publish (temp name, fsync, rename, fsync the directory), stale temps of
killed processes, the write-behind flusher, and which filesystem a path is on."""

from __future__ import annotations

import contextlib
import glob
import os
import socket
import stat
import threading
from pathlib import Path
from typing import Iterator

from .errors import InputError

WRITE_BEHIND_EVERY = 8 << 20   # bytes written between flushes of write_behind

# Filesystems where SQLite's locks and WAL's shared-memory index do not work across hosts (or at
# all).
NETWORK_FS = {"nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "beegfs", "ceph",
              "fuse.cephfs", "glusterfs", "fuse.glusterfs", "afs", "9p", "fuse.sshfs", "panfs",
              "orangefs", "pvfs2", "wekafs"}


def private_dir(path: Path, what: str = "local dir") -> Path:
    """``path`` as a directory of this user's alone: made 0700 (parents too) where missing, and
    refused (InputError) where another user owns it or group or others may write to it. On a shared
    machine a directory someone else made first is a place they can plant files in."""
    path = Path(path)
    if (why := replaceable(path)) is not None:
        raise InputError(f"{what} {path}: {why}: another user could point it elsewhere; choose a "
                         "directory of your own (storage.local_dir)")
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = path.stat()
    except OSError as e:
        raise InputError(f"{what} {path} is not writable: {e.strerror or e}") from e
    if st.st_uid != os.getuid():
        raise InputError(f"{what} {path} belongs to another user (uid {st.st_uid}); choose your own "
                         "(storage.local_dir) or remove it")
    if st.st_mode & 0o022:
        who = " and ".join(w for bit, w in ((0o020, "group"), (0o002, "others")) if st.st_mode & bit)
        raise InputError(f"{what} {path} is writable by {who} "
                         f"(mode {stat.S_IMODE(st.st_mode):04o}): others could plant files in it; "
                         f"chmod 700 {path}")
    return path


def replaceable(path: Path) -> str | None:
    """Why another user could swap ``path`` or a directory on the way to it, or None: a symbolic
    link on the way that is neither this user's nor root's (``ln -s /home/victim
    /tmp/unidask-victim`` before the victim's first run), or a directory others may write to
    without the sticky bit (they could rename what is in it). Checked before anything is made."""
    me = os.getuid()
    current = Path(path.anchor)
    parts = Path(os.path.abspath(path)).parts[1:]
    for i, part in enumerate(parts):
        current = current / part
        try:
            st = os.lstat(current)
        except (FileNotFoundError, NotADirectoryError):
            return None   # made by us from here on (or not at all: mkdir says why)
        except OSError as e:
            return f"cannot look at {current} ({e.strerror or e})"
        if stat.S_ISLNK(st.st_mode):
            if st.st_uid not in (me, 0):
                return f"{current} is a symbolic link of another user's (uid {st.st_uid})"
            target = Path(os.path.realpath(current))
            if (why := replaceable(target)) is not None:
                return why
            current = target
            continue
        # the last one itself: its owner and mode are private_dir's to judge
        if i < len(parts) - 1 and stat.S_ISDIR(st.st_mode) and st.st_mode & 0o002 \
                and not st.st_mode & stat.S_ISVTX and st.st_uid != me:
            return f"{current} may be written by anyone and has no sticky bit"
    return None


def kind(mode: int) -> str:
    """What a file of ``mode`` is, in a message."""
    for test, name in ((stat.S_ISREG, "a regular file"), (stat.S_ISDIR, "a directory"),
                       (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symbolic link"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a regular file"


def regular(path: Path, follow: bool = True) -> str | None:
    """Why ``path`` is not a regular file (never opening it: a FIFO would block), or None."""
    try:
        mode = (os.stat if follow else os.lstat)(path).st_mode
    except OSError as e:
        return f"cannot read it ({e.strerror or e})"
    return None if stat.S_ISREG(mode) else f"{kind(mode)}, not a regular file"


def owned_file(path: Path) -> str | None:
    """Why ``path`` is not a regular file of this user's that only they can write, or None."""
    try:
        st = os.lstat(path)
    except OSError as e:
        return f"cannot read it ({e.strerror or e})"
    if not stat.S_ISREG(st.st_mode):
        return f"{kind(st.st_mode)}, not a regular file"
    if st.st_uid != os.getuid():
        return f"it belongs to another user (uid {st.st_uid})"
    if st.st_mode & 0o022:
        return f"others may write to it (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def create_private(path: Path) -> None:
    """Create ``path`` empty and owner-only unless it exists (before SQLite opens it: SQLite makes
    a new file world-readable and gives its journals the same mode)."""
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))


def shared_mode() -> int:
    """The mode the umask gives a new file (for a file built owner-only, then published to be
    shared), read without changing the umask (os.umask would, for every thread a moment)."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open("/proc/self/status") as f:
            umask = int(next(line for line in f if line.startswith("Umask:")).split()[1], 8)
        return 0o666 & ~umask
    return 0o644


def process_start(pid: int) -> int:
    """When process ``pid`` of this host started (clock ticks since boot, field 22 of
    /proc/PID/stat); 0 if it is gone or a zombie. A stopped process (SIGSTOP) is alive."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat_ = f.read()
    except OSError:
        return 0
    fields = stat_[stat_.rindex(")") + 2:].split()
    return 0 if fields[0] in ("Z", "X") else int(fields[19])


def opened_by(path: Path) -> int | None:
    """A process of this host (other than this one) that holds ``path`` open, as far as /proc
    shows this user (its own processes: the ones that could write a file of theirs), or None."""
    target = os.path.realpath(path)
    for fd_dir in glob.glob("/proc/[0-9]*/fd"):
        pid = int(fd_dir.split("/")[2])
        if pid == os.getpid():
            continue
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            with contextlib.suppress(OSError):
                if os.readlink(f"{fd_dir}/{fd}") == target:
                    return pid
    return None


def raise_open_files() -> tuple[int, int]:
    """Raise this process's soft open-file limit to its hard one (Dask's advice for a process that
    holds many connections; children inherit it): (before, after)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft == resource.RLIM_INFINITY or soft >= hard:
        return soft, soft
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return soft, hard
    return soft, soft


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host still runs (the pid in a temp or shard file's name)."""
    return os.path.exists(f"/proc/{pid}")


def temp_name(dest: Path) -> Path:
    """Where ``dest`` is built before its rename: hidden, and naming the host and process."""
    return dest.with_name(f".{dest.name}.tmp-{socket.gethostname()}-{os.getpid()}")


def remove_stale_temps(dest: Path) -> None:
    """Remove temporaries of ``dest`` left by killed processes of this host (and our own)."""
    prefix = f".{dest.name}.tmp-{socket.gethostname()}-"
    for tmp in dest.parent.glob(f"{glob.escape(prefix)}*"):
        pid = tmp.name[len(prefix):].split("-")[0]  # also its -journal, -wal
        if pid.isdigit() and (int(pid) == os.getpid() or not pid_alive(int(pid))):
            tmp.unlink(missing_ok=True)


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (after a rename, so the new name survives a crash)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def publishing(dest: str | os.PathLike, mode: int | None = 0o600) -> Iterator[Path]:
    """Build ``dest`` whole: the body writes the yielded temp path; on success it is fsynced,
    renamed to ``dest`` and the directory fsynced, so ``dest`` only ever names a whole file. On
    failure the temp is removed and ``dest`` is untouched. ``mode`` is set before the rename
    (owner-only by default; None: what the umask gave, for files meant to be shared)."""
    dest = Path(dest)
    tmp = temp_name(dest)
    remove_stale_temps(dest)
    try:
        if mode is not None and mode & 0o077 == 0:   # owner-only while it is built, too
            create_private(tmp)
        yield tmp
        publish(tmp, dest, mode)
    finally:
        tmp.unlink(missing_ok=True)


def publish(tmp: Path, dest: Path, mode: int | None = 0o600) -> None:
    """fsync the whole file ``tmp``, rename it to ``dest``, fsync the directory."""
    if mode is not None:
        os.chmod(tmp, mode)
    fsync_path(tmp)
    os.replace(tmp, dest)
    fsync_path(dest.parent)


def write_atomic(dest: str | os.PathLike, data: bytes | str, mode: int | None = 0o600) -> Path:
    """Write ``data`` to ``dest`` through :func:`publishing`."""
    with publishing(dest, mode) as tmp:
        if isinstance(data, str):
            tmp.write_text(data)
        else:
            tmp.write_bytes(data)
    return Path(dest)


def filesystem_type(path: Path) -> str:
    """The type of the filesystem holding ``path`` (its longest mount point in /proc/mounts)."""
    path = Path(os.path.realpath(path))
    best, fstype = "", "unknown"
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return fstype
    for line in mounts:
        parts = line.split()
        if len(parts) < 3:
            continue
        mnt = parts[1].replace("\\040", " ")
        if (str(path) == mnt or str(path).startswith(mnt.rstrip("/") + "/")) and len(mnt) > len(best):
            best, fstype = mnt, parts[2]
    return fstype


def require_local_disk(path: Path) -> None:
    """Refuse ``path`` for live shards if it is on a network filesystem."""
    if (fstype := filesystem_type(path)) in NETWORK_FS:
        raise InputError(f"local dir {path} is on a network filesystem ({fstype}); a live shard "
                         "needs node-local disk (set storage.local_dir, or storage.allow_network_fs "
                         "= true to insist)")


def background_thread() -> None:
    """Lower the calling thread's CPU priority (Linux: a thread's nice value is its own), so that
    it takes only the CPU time others leave: work that must be done by a deadline, not first."""
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)


def _written(fd: int) -> int:
    """Bytes of a file that writes have made: its size where it grew at its end, its blocks where
    pages were written at their places in a sparse file (the page merge's units)."""
    st = os.fstat(fd)
    return max(st.st_size, st.st_blocks * 512)


@contextlib.contextmanager
def write_behind(path: Path, every: int = WRITE_BEHIND_EVERY, poll: float = 0.01) -> Iterator[None]:
    """While the body writes ``path``, flush it to disk on another thread each time it has grown
    by ``every`` bytes, so the closing sync (a commit's, the merge's fsync) finds little left: the
    disk works while the CPU inserts. The page cache would otherwise hold it all (Linux starts
    writing back only at 10% of memory dirty). Safe at any point: the kernel may write any dirty
    page back whenever it likes.

    Does nothing on a network filesystem (the merge's output on shared storage): there every flush
    is a round trip to its servers, slower than no flushing (README, Performance)."""
    if filesystem_type(path.parent) in NETWORK_FS:
        yield
        return
    stop = threading.Event()

    def flush() -> None:
        # best effort: the closing fsync_path is what makes the file durable, so a flush that
        # fails here only loses the overlap
        with contextlib.suppress(OSError):
            fd = os.open(path, os.O_RDONLY)
            try:
                flushed = last = _written(fd)
                wait = poll
                while not stop.wait(wait):
                    written = _written(fd)
                    # or the rest, once the writes pause: the disk goes on while the CPU does other work
                    if written >= flushed + every or flushed < written == last:
                        os.fdatasync(fd)
                        flushed = written
                        wait = 0   # look again at once: more was written meanwhile, keep the disk busy
                    else:
                        wait = poll
                    last = written
            finally:
                os.close(fd)

    thread = threading.Thread(target=flush, name="unidask-write-behind", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
