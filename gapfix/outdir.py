"""The output folder of a run (`--out`, `TrainConfig.out_dir`): one run at a time, and
nothing written outside it.

- `claim(out)` (a context manager) makes the folder, takes an exclusive lock on
  `<out>/gapfix.lock` (fcntl.flock, held until the block ends; a second run into the
  same folder gets an OutDirError naming the folder and the holder's pid), and refuses a
  folder whose tree holds a symbolic link: every file gapfix writes under `out`
  (metrics, summary, iterations' rows, data cache, checkpoints, the final model or
  adapter, reports) is then a path inside it, never a link to a file elsewhere that
  writing would truncate. `out` itself may be a link: the user named it.
  Claims nest: a process that holds a folder's lock may claim it again (the CLI claims
  --out, then train() claims it too). Under torchrun only rank 0 takes the lock (the
  ranks of one job share the folder); every rank checks the links.
- `open_file(path, mode)` opens a file gapfix writes in place (appends to, rewrites or
  truncates) without following a symbolic link, and refuses one with other hard links
  (writing it would change the other names' contents too).
"""
from __future__ import annotations

import contextlib
import errno
import os
import stat
from typing import IO, Iterator

LOCK_NAME = "gapfix.lock"

_held: dict = {}  # real path of a locked folder -> [file descriptor, nesting depth]


class OutDirError(ValueError):
    """An output folder that cannot be used; the message names it."""


def _rank() -> int:
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def make_folder(out: str, argument: str = "--out") -> str:
    """`out`, created if missing; an OutDirError when it is a file (or a link to one)."""
    out = os.fspath(out)
    if os.path.exists(out) and not os.path.isdir(out):
        raise OutDirError(f"{argument} {out!r} is a file, not a folder")
    if os.path.lexists(out) and not os.path.exists(out):
        raise OutDirError(f"{argument} {out!r} is a symbolic link to nothing")
    os.makedirs(out, exist_ok=True)
    return out


def find_link(folder: str) -> str | None:
    """The first symbolic link found in `folder`'s tree (`folder` itself excluded), or None."""
    for parent, dirs, files in os.walk(folder, followlinks=False):
        for name in dirs + files:  # os.walk lists a link to a folder among dirs, and does not enter it
            path = os.path.join(parent, name)
            if os.path.islink(path):
                return path
    return None


def check_no_links(folder: str, argument: str = "--out") -> None:
    """Refuses (OutDirError) a folder whose tree holds a symbolic link, naming the link."""
    link = find_link(folder)
    if link is not None:
        raise OutDirError(f"{argument} {folder!r}: {link} is a symbolic link (to {os.readlink(link)!r}); "
                          "gapfix writes only to files inside the folder, never through a link: "
                          "remove the link or pick another folder")


def _lock(out: str, argument: str) -> None:
    import fcntl

    real = os.path.realpath(out)
    if real in _held:
        _held[real][1] += 1
        return
    path = os.path.join(out, LOCK_NAME)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise OutDirError(f"{argument} {out!r}: {path} is a symbolic link") from None
        raise
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        os.close(fd)
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise OutDirError(
                f"{argument} {out!r} is in use by another gapfix run"
                f"{f' (pid {holder})' if holder.isdigit() else ''}, which holds {path}: wait for it to "
                "finish or pick another folder") from None
        if err.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):  # a file system without locks
            import warnings

            warnings.warn(f"{argument} {out!r}: cannot lock {path} on this file system ({err.strerror}); "
                          "nothing stops a second run from writing into the same folder", stacklevel=3)
            return
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode("ascii"), 0)
    _held[real] = [fd, 1]


def _unlock(out: str) -> None:
    real = os.path.realpath(out)
    entry = _held.get(real)
    if entry is None:
        return
    entry[1] -= 1
    if entry[1] == 0:
        del _held[real]
        os.close(entry[0])  # closing the descriptor releases the flock


@contextlib.contextmanager
def claim(out: str, argument: str = "--out") -> Iterator[str]:
    """The folder `out` for one run: created, locked (rank 0) and free of symbolic links.
    A folder this claim created is removed again when the run left nothing in it but the lock
    (a run refused before writing anything leaves no trace)."""
    created = not os.path.lexists(os.fspath(out))
    out = make_folder(out, argument)
    locked = _rank() == 0
    if locked:
        _lock(out, argument)
    try:
        check_no_links(out, argument)
        yield out
    finally:
        if locked:
            _unlock(out)
            if created and os.path.realpath(out) not in _held:
                with contextlib.suppress(OSError):
                    if os.listdir(out) == [LOCK_NAME]:
                        os.remove(os.path.join(out, LOCK_NAME))
                        os.rmdir(out)


def claims_out_dir(train):
    """Decorates `train(model, tokenizer, examples, config=None, **options)` so that it runs with
    its configuration's out_dir claimed (see `claim`)."""
    import functools

    @functools.wraps(train)
    def claimed(model, tokenizer, train_examples, config=None, **options):
        out = options.get("out_dir", getattr(config, "out_dir", None))
        if not out:
            return train(model, tokenizer, train_examples, config, **options)
        with claim(out, "out_dir"):
            return train(model, tokenizer, train_examples, config, **options)

    return claimed


def open_file(path: str, mode: str = "a") -> IO:
    """`path` opened for writing in place: "a" appends, "w" rewrites, "r+b" reads and writes
    (binary). Refuses (OutDirError) a symbolic link, something not a regular file, and a file
    with more than one hard link; a "w" file is emptied only once it has passed."""
    flags = {"a": os.O_WRONLY | os.O_APPEND | os.O_CREAT, "w": os.O_WRONLY | os.O_CREAT,
             "r+b": os.O_RDWR}[mode]
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise OutDirError(f"{path}: a symbolic link; gapfix writes only to files inside its folder, "
                              "never through a link") from None
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OutDirError(f"{path}: not a regular file")
        if info.st_nlink > 1:
            raise OutDirError(f"{path}: has {info.st_nlink} hard links; writing it would change the "
                              "other names' contents too: remove it or pick another folder")
        if mode == "w":
            os.ftruncate(fd, 0)
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, {"a": "a", "w": "w", "r+b": "r+b"}[mode])


def fsync_path(path: str) -> None:
    """fsyncs a file or folder by path (its inode, whichever process wrote it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
