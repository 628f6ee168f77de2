"""Output files that appear whole or not at all, and replace nothing the run did not expect.

Each output is written to a hidden temp file beside it, `.NAME.XXXXXXXX.part` (NAME shortened so the
temp name fits NAME_MAX), held with an exclusive flock while the run lives. When all outputs are
complete they are moved into place together, with termination signals held back:

- a target that was absent when the run began must still be absent: the move refuses to replace
  (renameat2 RENAME_NOREPLACE, or link() then unlink() where the file system lacks it), so a file
  that appeared meanwhile, or a second run writing the same output, is never overwritten;
- a target that existed (the caller allowed replacing it, e.g. --force) must be a regular file, and
  still the same file (device, inode, size and times) at the end; a directory, device, FIFO, socket or symbolic
  link is never replaced;
- if a move fails, the outputs already moved that did not exist before are removed again.

A run killed with SIGKILL cannot clean up: the next run writing to the same directory removes temp
files of its own name pattern that no live run holds locked, and names any it cannot remove in one
warning line.
"""

from __future__ import annotations

import contextvars
import ctypes
import errno
import fcntl
import functools
import os
import stat
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ..errors import UserError
from ..signals import deferred

TEMP_SUFFIX = ".part"
RANDOM_CHARS = 8  # tempfile's random part
DEFAULT_NAME_MAX = 255
RENAME_NOREPLACE = 1
AT_FDCWD = -100  # Linux
_FILE_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISLNK, "a symbolic link"), (stat.S_ISCHR, "a character device"),
               (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"))


def name_max(directory: Path) -> int:
    try:
        return os.pathconf(directory, "PC_NAME_MAX")
    except (OSError, ValueError):
        return DEFAULT_NAME_MAX


def _shorten(name: str, max_bytes: int) -> str:
    """`name` cut to at most `max_bytes` of UTF-8, on a character boundary."""
    return name.encode("utf-8", "surrogateescape")[:max_bytes].decode("utf-8", "ignore")


def temp_prefix(target: Path) -> str:
    """'.NAME.' with NAME shortened so that prefix + random part + '.part' fits in one file name."""
    room = name_max(target.parent) - 2 - RANDOM_CHARS - len(TEMP_SUFFIX)
    return f".{_shorten(target.name, room)}."


def describe_kind(mode: int) -> str | None:
    """'a directory', 'a FIFO' ... for anything but a regular file."""
    return next((what for test, what in _FILE_KINDS if test(mode)), None if stat.S_ISREG(mode) else "not a file")


# -- before writing -------------------------------------------------------------------------------

# Whether an existing output may be replaced (convert_hf / quantize_gguf set it from `force`); None: the
# caller of the writer has already decided, and whatever exists when writing starts may be replaced.
_REPLACE: contextvars.ContextVar[bool | None] = contextvars.ContextVar("gguforge_replace", default=None)


@contextmanager
def replacing(allowed: bool) -> Iterator[None]:
    """Within the block, outputs that exist when writing starts are replaced only if `allowed`."""
    token = _REPLACE.set(allowed)
    try:
        yield
    finally:
        _REPLACE.reset(token)



def identity(st: os.stat_result) -> tuple[int, ...]:
    """What tells one regular file from another that took its name (an inode number alone can be reused)."""
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def expect(target: Path) -> tuple[int, ...] | None:
    """What the target is now: None when absent, else the identity of a regular file."""
    try:
        st = os.lstat(target)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise UserError(f"cannot write {target}: {e.strerror}") from None
    if _REPLACE.get() is False:  # also a file that appeared after the caller looked
        raise UserError(f"{target} already exists", hint="pass --force to overwrite it")
    kind = describe_kind(st.st_mode)
    if kind is not None:
        raise UserError(f"refusing to replace {target}: it is {kind}, not a regular file",
                        hint="choose another output name")
    return identity(st)


def create_temp(target: Path) -> tuple[int, str]:
    """A new locked temp file beside `target`: (file descriptor, path)."""
    directory = target.parent if str(target.parent) else Path(".")
    if not directory.is_dir():
        what = "is not a directory" if directory.exists() else "does not exist"
        raise UserError(f"output directory {directory} {what}")
    if len(target.name.encode("utf-8", "surrogateescape")) > name_max(directory):
        raise UserError(f"cannot write {target}: file name too long (more than {name_max(directory)} bytes)")
    prefix = temp_prefix(target)
    remove_stale_temps(directory, prefix)
    try:
        fd, path = tempfile.mkstemp(prefix=prefix, suffix=TEMP_SUFFIX, dir=directory)
    except OSError as e:
        raise UserError(f"cannot write {target}: {e.strerror} (in {directory})") from None
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # tells later runs this temp file is alive
    return fd, path


def _is_our_temp(name: str, prefix: str) -> bool:
    return (name.startswith(prefix) and name.endswith(TEMP_SUFFIX)
            and len(name) == len(prefix) + RANDOM_CHARS + len(TEMP_SUFFIX))


JUST_CREATED_S = 10


def _stale(path: str) -> bool:
    """Nobody holds the file locked, and it is not a temp file created this very moment (empty and
    unlocked for the few microseconds between its creation and its lock)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or (st.st_size == 0 and time.time() - st.st_mtime < JUST_CREATED_S):
            return False
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:  # locked: a live run is writing it
        return False
    finally:
        os.close(fd)


def remove_stale_temps(directory: Path, prefix: str) -> None:
    """Remove temp files a killed run left for this name; warn (one line) about those that stay."""
    try:
        names = [e.name for e in os.scandir(directory) if _is_our_temp(e.name, prefix)]
    except OSError:
        return
    left = []
    for name in names:
        path = os.path.join(directory, name)
        if not _stale(path):
            continue
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError:
            left.append(name)
    if left:
        more = f" (and {len(left) - 1} more)" if len(left) > 1 else ""
        sys.stderr.write(f"warning: temp file {os.path.join(directory, left[0])}{more} left by an interrupted "
                         f"run could not be removed; delete it by hand\n")


# -- moving into place ----------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _renameat2():
    try:
        return ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None


def rename_noreplace(src: str, dst: Path) -> None:
    """Move src to dst unless dst exists (FileExistsError), in one step where the system allows."""
    fn = _renameat2()
    if fn is not None:
        if fn(AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dst), RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
            raise OSError(err, os.strerror(err), str(dst))
    try:
        os.link(src, dst)  # fails on an existing name, as RENAME_NOREPLACE does
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK):
            raise
        if os.path.lexists(dst):  # no hard links here either (FAT, some FUSE): check, then rename
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst)) from None
        os.rename(src, dst)
        return
    os.unlink(src)


def _still_expected(target: Path, expected: tuple[int, ...] | None) -> bool:
    try:
        st = os.lstat(target)
    except FileNotFoundError:
        return expected is None
    return expected is not None and stat.S_ISREG(st.st_mode) and identity(st) == expected


def _changed(target: Path) -> UserError:
    return UserError(f"{target} was created or changed by someone else while writing; it was not replaced "
                     "and nothing was written", hint="another run writing the same output? choose another name")


def place(temp: str, target: Path, expected: tuple[int, ...] | None) -> None:
    if expected is None:
        try:
            rename_noreplace(temp, target)
        except FileExistsError:
            raise _changed(target) from None
        return
    if not _still_expected(target, expected):
        raise _changed(target)
    os.replace(temp, target)


def commit(temps: list[str], targets: list[Path], expected: list[tuple[int, ...] | None]) -> None:
    """Move every temp file onto its target, all or none (see the module text)."""
    with deferred():
        for target, exp in zip(targets, expected):
            if not _still_expected(target, exp):
                raise _changed(target)
        placed: list[Path] = []
        try:
            for temp, target, exp in zip(temps, targets, expected):
                place(temp, target, exp)
                placed.append(target)
        except BaseException:
            for target, exp in zip(placed, expected):
                if exp is None:
                    unlink_quietly(target)
            raise


def unlink_quietly(path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
