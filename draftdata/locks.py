"""An exclusive lock on a local output directory, held by one run at a time (collect, train).

A POSIX record lock (`lockf`) on a hidden file in the directory (readers ignore hidden names)
stops a second run on the same output with a one-line error naming the holder's pid. The kernel
drops it when the holder dies, even by SIGKILL, so a crash never leaves a stale lock; and unlike
an `flock` it is not shared with forked children, so DataLoader workers that outlive a killed
trainer for a few seconds do not hold it. The file stays after the run; only a held lock means
a run is going on.

POSIX locks belong to the process, so a second lock on the same file from this process would be
granted, and closing its descriptor would drop the first: the paths this process holds are kept
in `_HELD`, and a second holder in the process is refused without opening the file again.
"""

from __future__ import annotations

import errno
import fcntl
import os
import sys

from draftdata.errors import DraftdataError

_HELD: dict[tuple[int, int], str] = {}  # (st_dev, st_ino) of the lock files this process holds -> path

COLLECT_LOCK = ".collect.lock"  # a dataset's writers: collect, and `verify --gc`, which deletes what they leave


class DirectoryLock:
    """Hold `<url>/<name>` exclusively for `command` (a no-op for URLs that are not local paths).

    Taken at construction when the directory exists (a resume is refused before a model loads),
    else by `take()` once the run has created it. `doing` ends the refusal ("another draftdata
    <command> (pid N) is <doing>"); `unlocked_note` says what still protects a file system that
    offers no lock.
    """

    def __init__(self, url: str, name: str, command: str, doing: str, unlocked_note: str, flag: str = "--output"):
        from draftdata.store.fs import is_local, local_path

        self.url, self.fd = url, -1
        self.command, self.doing, self.unlocked_note = command, doing, unlocked_note
        self.where = f"{flag} {url}" if flag else url
        self.hint = "wait for it to finish" + (f", or use another {flag}" if flag else "")
        self.path = os.path.join(local_path(url), name) if is_local(url) else None
        if self.path and os.path.isdir(os.path.dirname(self.path)):
            self.take()

    def take(self) -> None:
        """Hold the lock (once the output directory exists); a no-op when held or not local."""
        if self.fd >= 0 or self.path is None:
            return
        try:
            st = os.stat(self.path)
        except OSError:
            st = None
        if st is not None and (st.st_dev, st.st_ino) in _HELD:
            raise DraftdataError(f"{self.where}: another draftdata {self.command} in this process (pid "
                                 f"{os.getpid()}) is {self.doing}; {self.hint}")
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise DraftdataError(f"{self.where}: cannot create {self.path} ({e.strerror or e}); is the "
                                 "directory writable?") from None
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EACCES, errno.EAGAIN):
                # "<pid>\t<command>\t<what it is doing>" (a bare pid from older versions: this lock's own words)
                holder = os.read(fd, 256).decode(errors="replace").strip().split("\t")
                os.close(fd)
                pid = holder[0] or "unknown"
                command, doing = holder[1:3] if len(holder) >= 3 else (self.command, self.doing)
                raise DraftdataError(f"{self.where}: another draftdata {command} (pid {pid}) is {doing}; "
                                     f"{self.hint}") from None
            os.close(fd)
            if e.errno not in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                raise DraftdataError(f"{self.where}: cannot lock {self.path} ({e.strerror or e})") from None
            print(f"draftdata {self.command}: warning: {self.path}: the file system offers no lock ({e.strerror}); "
                  f"make sure no other {self.command} uses this output ({self.unlocked_note})", file=sys.stderr)
            self.path = None  # unlocked: take() is a no-op from here on
            return
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\t{self.command}\t{self.doing}\n".encode())
        st = os.fstat(fd)
        self.fd, self._key = fd, (st.st_dev, st.st_ino)
        _HELD[self._key] = self.path

    def release(self) -> None:
        if self.fd >= 0:
            _HELD.pop(self._key, None)
            os.close(self.fd)
            self.fd = -1
