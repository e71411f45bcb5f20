"""The one atomic writer and the one content hash of the project.

Every file an artifact consists of is written through ``atomic_write``: a temp name beside the
target, renamed into place, mode 0644, so a reader never sees half a file and a bundle copied to
another user stays readable. A failed write is one line naming the file that could not be written.
Writes never follow a link: the temp file is created new (O_EXCL | O_NOFOLLOW), and a target that
is a symbolic link is refused, so a link planted in an output folder cannot send bytes outside it.
"""
from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import stat
from pathlib import Path
from typing import Callable

from edgerun.errors import EdgeError

FILE_MODE = 0o644


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def hash_json(obj) -> str:
    """The hash of a JSON-able value, independent of key order."""
    return sha256_bytes(json.dumps(obj, sort_keys=True, default=str).encode())


def atomic_write(path: str | os.PathLike, write: Callable[[str], object] | bytes | str) -> Path:
    """Write ``path`` whole or not at all.

    ``write`` is bytes, text, or a callable that writes to the temp path it is given (for
    libraries that only write to a path: torch.save, onnx.save, np.savez).
    """
    path = Path(path)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        refuse_link(path, "write through it")
        # Created here, new and not through a link; a library that writes to a path opens this file.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            if not callable(write):
                f.write(write if isinstance(write, bytes) else write.encode())
        if callable(write):
            write(str(tmp))
        if not stat.S_ISREG(os.lstat(tmp).st_mode):
            raise EdgeError(f"{path}: the temporary file {tmp.name} was replaced by a link or a special file")
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise EdgeError(f"{path}: could not write ({e.strerror or e}): disk full or not writable?") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def refuse_link(path: str | os.PathLike, what: str) -> None:
    """One line instead of following a symbolic link out of the folder a file belongs in."""
    if os.path.islink(path):
        raise EdgeError(f"{path}: is a symbolic link (to {os.readlink(path)}); refusing to {what}: "
                        f"outputs never follow a link out of their folder (remove the link)")


def write_json(path: str | os.PathLike, obj) -> Path:
    return atomic_write(path, json.dumps(obj, indent=2, default=str) + "\n")


def copy_file(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Copy ``src`` to ``dst`` atomically; an error names the file that could not be written."""
    src = Path(src)
    if not os.access(src, os.R_OK) or not src.is_file():
        raise EdgeError(f"{src}: not a readable file")
    return atomic_write(dst, lambda tmp: shutil.copyfile(src, tmp))
