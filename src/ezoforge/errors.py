"""User-facing errors: the CLI prints their message (which names file, line and field) and exits non-zero."""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path


class EzoError(Exception):
    exit_code = 1


class ConfigError(EzoError, ValueError):
    """A recipe, override or flag that does not validate."""

    exit_code = 2


class ModelError(EzoError, ValueError):
    """A model spec that cannot be resolved or loaded."""


class RecordError(EzoError, ValueError):
    """Bad input data; the message starts with FILE:LINE (or FILE for whole-file problems)."""


class MachineFault(EzoError):
    """The machine or another process, not the input: a full disk, a read-only or forbidden path, memory that ran
    out, a folder another process is writing. Work already finished is kept: fix that and rerun to resume."""

    exit_code = 75  # EX_TEMPFAIL (sysexits.h): try again once the cause is gone

    def __init__(self, message: str, resource: str | None = None, stage: str | None = None):
        super().__init__(message)
        self.resource = resource  # "disk", "ram" or "gpu": where the recipe is known, the plan's figure is added
        self.stage = stage


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_NOT_WRITABLE = {errno.EROFS: "a read-only file system", errno.EACCES: "permission denied",
                 errno.EPERM: "operation not permitted"}


def machine_fault(error: BaseException, folder: str | Path | None = None, stage: str | None = None) -> MachineFault | None:
    """`error` as the machine fault it is, in one line naming the path (the file, else `folder`) or the figure;
    None when it is not one (a bug, or the user's input)."""
    if isinstance(error, MachineFault):
        return error
    where = getattr(error, "filename", None) or folder
    if isinstance(error, OSError) and error.errno in _DISK_FULL:
        free = None if where is None else free_bytes(where)
        return MachineFault(f"the disk is full ({os.strerror(error.errno)}) writing {where or 'a file'}"
                            + ("" if free is None else f": {size(free)} free there"), "disk", stage)
    if isinstance(error, OSError) and error.errno in _NOT_WRITABLE:
        return MachineFault(f"{where or 'a file'}: {_NOT_WRITABLE[error.errno]} ({os.strerror(error.errno)})",
                            None, stage)
    if type(error).__name__ == "OutOfMemoryError":  # torch's, raised for CUDA (and other accelerators)
        return MachineFault(f"out of GPU memory: {str(error).splitlines()[0] if str(error) else 'an allocation failed'}",
                            "gpu", stage)
    # torch's CPU allocator raises a RuntimeError, Python a MemoryError
    if isinstance(error, MemoryError) or (isinstance(error, RuntimeError) and "can't allocate memory" in str(error)):
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return MachineFault(f"out of host memory ({size(total)} on this machine)", "ram", stage)
    return None


@contextlib.contextmanager
def faults_named(folder: str | Path | None = None, stage: str | None = None):
    """Raise a machine fault in the block as the MachineFault it is (machine_fault), anything else as it is."""
    try:
        yield
    except BaseException as e:
        fault = machine_fault(e, folder, stage)
        if fault is None or fault is e:
            raise
        raise fault from e


def free_bytes(path: str | Path) -> int:
    """Free space on the file system that holds `path` (or would: its nearest existing folder)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def size(n: float) -> str:
    """Bytes as people read them: 28 KiB, 3.1 MiB, 1.20 GiB."""
    if n >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    if n >= 2**20:
        return f"{n / 2**20:.1f} MiB"
    return f"{n / 2**10:.0f} KiB"
