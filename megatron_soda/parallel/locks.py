"""One job per directory: an advisory lock a process holds for its lifetime.

Two `soda train` in one run directory would mix their checkpoints and metrics, and two `soda
prepare` of the same slice would write the same shards. The lock is a POSIX record lock (`lockf`)
on a file in the directory: the kernel releases it when the holder dies however it dies (kill -9, a
node lost by SLURM), so a stale lock never blocks a resume; it is not inherited by forked children
(checkpoint writers, loader workers), so none of them can outlive the holder and keep it; and it
works across nodes on NFS / Lustre mounted with locking. The file names the holder (host, pid,
start time) for the refusal.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
import time
from pathlib import Path
from typing import IO

from megatron_soda.config import UserError

log = logging.getLogger("soda")


class LockHeld(UserError):
    """Another live process holds the directory's lock."""


def hold(path: str | Path, what: str) -> IO:
    """Take the lock at `path` (created if needed) or raise LockHeld naming its holder. Keep the
    returned file open as long as the lock should last (closing it or exiting releases it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "a+")
    try:
        fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EAGAIN):
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                raise
            log.warning("%s: this filesystem has no file locks (%s): nothing stops a second job here", path, e)
            return _record_holder(f)
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise LockHeld(
            f"{path.parent} is in use by {holder} ({what}); a second job there would mix their outputs: "
            "wait for it to end, stop it, or use another directory"
        ) from None
    return _record_holder(f)


def _record_holder(f: IO) -> IO:
    f.seek(0)
    f.truncate()
    f.write(f"host {socket.gethostname()} pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    f.flush()
    return f
