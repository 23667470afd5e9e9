"""Hidden partial files that become results by an atomic rename, and the clean-up of stale ones.

A file is written as ``.NAME.HOST-PID.partial`` beside its final name, then ``os.replace``d: a
reader never sees half a result. A process killed between the two leaves the partial behind;
the next writer of the same name removes those whose process is gone. The host is in the name
because a shared file system may hold partials of live processes on other machines.
"""
from __future__ import annotations

import glob
import os
import socket
from pathlib import Path

SUFFIX = ".partial"


def partial_path(final: Path) -> Path:
    """This process's partial file for ``final``."""
    return final.with_name(f".{final.name}.{socket.gethostname()}-{os.getpid()}{SUFFIX}")


def remove_stale_partials(final: Path) -> list[Path]:
    """Delete the partial files of ``final`` left by dead processes of this host; returns them."""
    prefix = f".{final.name}.{socket.gethostname()}-"
    removed = []
    for name in glob.glob(glob.escape(str(final.parent / prefix)) + "*" + SUFFIX):
        pid = name[len(str(final.parent / prefix)) : -len(SUFFIX)]
        if pid.isdigit() and not process_alive(int(pid)):
            Path(name).unlink(missing_ok=True)
            removed.append(Path(name))
    return removed


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host."""
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True      # it exists, under another user
    return True
