"""The one atomic folder writer: every folder the project writes (checkpoints, streamed checkpoints,
the offline model cache) appears whole or not at all.

:func:`publish_folder` hands out a temporary sibling named after the writing process
(``.<name>.<pid>.<random>``), gives it the permissions a plain ``mkdir``/``open`` would under the
user's umask, and swaps it into place in one ``renameat2(RENAME_EXCHANGE)`` where Linux offers it (two
renames elsewhere). Temporaries left by a process that was killed (its pid is gone) are swept by the
next write of the same folder, and an old folder renamed aside by a killed swap is put back.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

log = logging.getLogger(__name__)


@contextlib.contextmanager
def publish_folder(out: str | os.PathLike, *, keep_existing: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """Write the folder ``out`` atomically: the block fills the temporary folder it is given; when it
    returns, that folder replaces ``out`` (at every instant either the old folder or the new one exists);
    when it raises, the temporary folder is removed and ``out`` is left as it was.

    Args:
        out: the folder to publish; its parent is created.
        keep_existing: called with ``out`` before the swap: True keeps what is there (a concurrent
            writer already published an equivalent folder) and discards the new one.

    Yields:
        The temporary folder to write into, a sibling of ``out``.

    Raises:
        OSError: the disk is full or not writable (``out`` is left as it was).
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_temporaries(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.{os.getpid()}.", dir=out.parent))
    try:
        yield tmp
        umask_permissions(tmp)
        if keep_existing is not None and keep_existing(out):
            log.info("%s was published meanwhile by another writer; keeping it", out)
        else:
            _swap(tmp, out, keep_existing)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already when it was swapped in


def _swap(tmp: Path, out: Path, keep_existing: Callable[[Path], bool] | None) -> None:
    """Put ``tmp`` in the place of ``out``; ``tmp`` then holds the old folder, or nothing."""
    if out.exists() and _exchange(tmp, out):
        return
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    try:
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
    except OSError:
        if keep_existing is None or not keep_existing(out):  # not a concurrent writer's equal copy: a failure
            raise
    shutil.rmtree(old, ignore_errors=True)


def sweep_stale_temporaries(out: Path) -> None:
    """Clean up after writes of ``out`` whose process is gone: remove their half-written
    ``.<name>.<pid>.*`` folders, and put back an old folder a killed swap had renamed aside
    (``.<name>.old-<pid>``)."""
    if not out.parent.is_dir():
        return
    prefix = f".{out.name}."
    for entry in out.parent.iterdir():
        if not entry.name.startswith(prefix) or entry.is_symlink() or not entry.is_dir():
            continue
        rest = entry.name[len(prefix) :]
        pid = rest.removeprefix("old-") if rest.startswith("old-") else rest.split(".")[0]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        if rest.startswith("old-") and not out.exists():
            os.replace(entry, out)
            log.warning("restored %s, which an interrupted write had renamed aside", out)
        else:
            shutil.rmtree(entry, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def umask_modes(folder: Path) -> tuple[int, int]:
    """The permission bits ``mkdir`` and ``open`` give a new folder and file in ``folder`` under this
    process's umask, read off a probe of each: setting the umask to read it and restoring it would
    change it for other threads creating files meanwhile."""
    probe = Path(folder) / f".umask-probe-{os.getpid()}-{threading.get_ident()}"
    probe.mkdir()
    dirs = probe.stat().st_mode & 0o777  # 0o777 & ~umask
    probe.rmdir()
    os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    files = probe.stat().st_mode & 0o777  # 0o666 & ~umask
    probe.unlink()
    return dirs, files


def umask_permissions(folder: Path) -> None:
    """Give ``folder`` and everything in it the permissions of :func:`umask_modes`
    (``tempfile.mkdtemp`` makes it owner-only, and safetensors its files too), so a published folder
    is as readable as any folder its user makes."""
    dirs, files = umask_modes(folder)
    for root, _, names in os.walk(folder):
        os.chmod(root, dirs)
        for name in names:
            os.chmod(os.path.join(root, name), files)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths; False where the system cannot (then nothing changed)."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None) if sys.platform == "linux" else None
    if renameat2 is None:
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EPERM):  # kernel or file system without it
        return False
    raise OSError(code, f"cannot swap {a} into {b}: {os.strerror(code)}")
