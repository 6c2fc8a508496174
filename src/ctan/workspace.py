"""Names that become folder names, the one check that keeps every output path inside its folder, and who
may write a folder.

Dataset, task and architecture names are path components (``<paths.raw>/<dataset>``,
``<paths.models>/<dataset>/<arch>/seed<n>/<task>``), so they must be plain identifiers: a letter, then
letters, digits or ``_``. The schema (``params.schema.yaml``: ``datasets`` property names,
``run.datasets``), the CLI and Snakemake's wildcard constraints all accept exactly `NAME_PATTERN`, and
every output path the package builds from a name goes through `inside`, which refuses a path that
resolves outside its configured folder (a ``..`` component, an absolute part, or a symbolic link that
leads elsewhere) or that a file stands in the way of.

`exclusive` holds an advisory lock (``fcntl.flock`` on ``.ctan.lock`` inside the folder) for as long as
one command writes it: a second command finds it held and stops, and the operating system drops the lock
when its holder dies, even by SIGKILL, which a pid file could not tell. Hidden work folders
(`partial_folder`) hold that lock while they are being built, so the leftovers of killed runs can be told
from a concurrent run's work and swept (`sweep_partials`, `sweep_temporaries`): nothing else ever removes
them, and a preprocessed store's can weigh gigabytes.
"""

from __future__ import annotations

import errno
import fcntl
import glob
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ctan.errors import CtanError

NAME_PATTERN = r"[A-Za-z][A-Za-z0-9_]*"
_NAME = re.compile(NAME_PATTERN)


def blocking_parent(path: Path) -> tuple[Path, str] | None:
    """Why no file or folder can be made at ``path``: ``(its nearest existing parent, "file")`` when that
    parent is a file, ``(parent, "read-only")`` when it cannot be written; None when it can."""
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                return parent, "file"
            if not os.access(parent, os.W_OK | os.X_OK):
                return parent, "read-only"
            return None
    return None


def check_name(kind: str, name: str) -> str:
    """``name`` itself if it is a plain identifier; else CtanError naming the ``kind`` (dataset, task...)."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise CtanError(
            None,
            f"{kind} name {name!r} is not a plain identifier "
            "(a letter, then letters, digits or _; it becomes a folder name)",
        )
    return name


def inside(root: str | Path, *parts: str) -> Path:
    """``root / part / ...``, refused (CtanError) unless it resolves strictly inside ``root``.

    The path is returned as built (relative stays relative), so messages and provenance read as before.
    """
    root = Path(root)
    path = root.joinpath(*parts)
    resolved, top = path.resolve(), root.resolve()
    if resolved == top or not resolved.is_relative_to(top):
        raise CtanError(path, f"resolves outside its configured folder {root}; refusing to write there")
    for folder in (*reversed(path.parents), path):  # every one of them must be (or become) a folder
        if folder.exists() and not folder.is_dir():
            raise CtanError(
                folder, f"is a file where ctan keeps the folder {path}; move the file away (or rename it)"
            )
    return path


LOCK_NAME = ".ctan.lock"
# A partial folder without a lock file is either from a run older than these locks or one caught between
# creating its folder and locking it (microseconds): treated as stale once it is this old.
UNLOCKED_GRACE_S = 60.0
_TEMPORARY = re.compile(r"\..+\.tmp-(?P<pid>[0-9]+)")
_HELD: set[int] = set()  # lock descriptors of this process
_NO_LOCKS = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP}  # what flock says where a filesystem has none


def _close_held_in_child() -> None:
    """A forked child (a DataLoader worker) must not keep its parent's locks alive after the parent died."""
    for fd in _HELD:
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()


os.register_at_fork(after_in_child=_close_held_in_child)


def _holder(fd: int) -> str:
    """Who holds a lock, from what its holder wrote into the lock file, for the message."""
    try:
        text = os.pread(fd, 200, 0).decode(errors="replace").split()
    except OSError:
        text = []
    if len(text) != 2 or not text[0].isdigit():
        return "pid unknown"
    return f"pid {text[0]} on host {text[1]}"


def _try_lock(lock: Path, create: bool) -> int | None:
    """An open descriptor of ``lock`` holding its exclusive flock, or None when another process holds it.

    The holder unlinks the file before unlocking it, so a lock taken on a file that meanwhile left its path
    is no lock at all: try again on the file now there."""
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if create else 0), 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        try:
            now = os.stat(lock)
            mine = os.fstat(fd)
            if (now.st_dev, now.st_ino) == (mine.st_dev, mine.st_ino):
                _HELD.add(fd)
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)
        if not create:
            raise FileNotFoundError(lock)


def _release(lock: Path, fd: int) -> None:
    """Unlink first, then unlock: the lock file exists only while held (DVC hashes model folders)."""
    try:
        lock.unlink(missing_ok=True)
    finally:
        _HELD.discard(fd)
        os.close(fd)


def _acquire(lock: Path, folder: Path, what: str) -> int:
    """The held lock's descriptor; CtanError naming the holder when another process holds it."""
    for _ in range(3):
        fd = _try_lock(lock, create=True)
        if fd is not None:
            return fd
        try:
            probe = os.open(lock, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:  # the holder finished since: try again
            continue
        try:
            holder = _holder(probe)
        finally:
            os.close(probe)
        raise CtanError(
            folder, f"another {what} ({holder}) is writing {folder}; wait for it to finish or stop it"
        )
    raise CtanError(folder, f"another {what} is writing {folder}; wait for it to finish or stop it")


@contextmanager
def exclusive(folder: Path, what: str) -> Iterator[None]:
    """Hold ``folder``'s lock while the block runs; CtanError naming the holder when another process has
    it (``what`` names that command: "ctan train"). Released on any exit, and by the OS on death.

    On a filesystem without locks (Lustre mounted ``noflock``) the block runs unguarded, with a warning,
    and the lock file stays while it runs, so that `sweep_partials` never takes the folder for dead."""
    folder = Path(folder)
    lock = folder / LOCK_NAME
    try:
        fd = _acquire(lock, folder, what)
    except OSError as err:
        if err.errno not in _NO_LOCKS:
            raise CtanError(lock, f"cannot take the lock: {err.strerror or err}") from None
        print(
            f"warning: {folder}: this filesystem does not support locks ({err.strerror}); nothing keeps a "
            f"second {what} from writing here at the same time",
            file=sys.stderr,
        )
        fd = None
    if fd is None:
        try:
            yield
        finally:
            lock.unlink(missing_ok=True)
        return
    try:
        os.ftruncate(fd, 0)  # a killed holder's text may still be there
        os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        yield
    finally:
        _release(lock, fd)


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this host (one owned by another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _size(path: Path) -> int:
    if path.is_symlink() or not path.is_dir():
        try:
            return path.lstat().st_size
        except FileNotFoundError:
            return 0
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def _human(size: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"


def _remove_leftover(path: Path) -> None:
    """Delete what a killed run left, saying what and how big (one line)."""
    size = _size(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
    print(f"{path}: removed, left by a killed run ({_human(size)})")


def sweep_partials(target: Path) -> None:
    """Remove the hidden ``.<name>.partial-*`` folders beside ``target`` whose lock can be taken (their
    run is dead), keeping those a running command holds."""
    target = Path(target)
    if not target.parent.is_dir():
        return
    for folder in sorted(target.parent.glob(f".{glob.escape(target.name)}.partial-*")):
        if folder.is_symlink() or not folder.is_dir():
            continue
        try:
            fd = _try_lock(folder / LOCK_NAME, create=False)
        except FileNotFoundError:  # no lock file: an older run's, or one being created this instant
            try:
                if time.time() - folder.stat().st_mtime > UNLOCKED_GRACE_S:
                    _remove_leftover(folder)
            except FileNotFoundError:
                pass
            continue
        except OSError:
            continue
        if fd is None:
            continue  # a concurrent run is building it
        try:
            _remove_leftover(folder)
        finally:
            _HELD.discard(fd)
            os.close(fd)


@contextmanager
def partial_folder(target: Path) -> Iterator[Path]:
    """A new hidden work folder beside ``target`` (same filesystem, so its result is renamed into place),
    locked while the block runs and deleted after; dead runs' partial folders are swept first."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    sweep_partials(target)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        with exclusive(work, "ctan command"):
            yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)  # unlocked now, but just touched: no sweeper takes it


def temporary(path: Path) -> Path:
    """The name a file is written under before it is renamed onto ``path``: ``.<name>.tmp-<pid>``."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def sweep_temporaries(folder: Path) -> None:
    """Remove `temporary` files in ``folder`` whose writer is no live process on this host (a killed
    run's; this process's own pid counts as dead: call it before writing). Safe where the caller holds the
    folder's `exclusive` lock, which keeps other writers out."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for path in sorted(folder.iterdir()):
        match = _TEMPORARY.fullmatch(path.name)
        if not match or path.is_dir():
            continue
        pid = int(match["pid"])
        if pid == os.getpid() or not pid_alive(pid):
            _remove_leftover(path)
