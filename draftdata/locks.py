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
        self.where, self.hint = _where_and_hint(url, flag)
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
                pid, command, doing = _lock_file_holder(fd)
                os.close(fd)
                command, doing = command or self.command, doing or self.doing
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


def _where_and_hint(url: str, flag: str) -> tuple[str, str]:
    """How a refusal names the output ("--output URL") and what it advises."""
    return (f"{flag} {url}" if flag else url), "wait for it to finish" + (f", or use another {flag}" if flag else "")


def _lock_file_holder(fd: int) -> tuple[str, str | None, str | None]:
    """(pid, command, what it is doing) from a lock file, written "<pid>\t<command>\t<doing>"
    (a bare pid by older versions: command and doing None)."""
    fields = os.read(fd, 256).decode(errors="replace").strip().split("\t")
    command, doing = fields[1:3] if len(fields) >= 3 else (None, None)
    return fields[0] or "unknown", command, doing


LEASE_REFRESH_S = 20.0  # how often a holder rewrites its lease object
LEASE_STALE_ENV = "DRAFTDATA_LEASE_STALE_S"
LEASE_STALE_S = 120.0  # a lease not rewritten for this long belongs to a run killed on another machine


class ObjectLease:
    """Hold `<url>/<name>` on an object store for one run: what the POSIX lock does on a file system.

    Object stores have no locks, but S3 (and compatible stores) refuse a conditional PUT
    (`If-None-Match: *`) of an existing key: the lease object names its holder (pid, host, a
    random token), a thread rewrites it every LEASE_REFRESH_S, and release deletes it. A lease
    whose holder is a dead process on this machine, or that was not rewritten for LEASE_STALE_S
    ($DRAFTDATA_LEASE_STALE_S; a run killed on another machine), is taken over with a note. A store
    without conditional PUTs gets a plain PUT and the read-back below it (`put_atomic`), so two
    runs starting within the same second may both proceed; every collect's closing duplicate check
    still reports that.
    """

    def __init__(self, url: str, name: str, command: str, doing: str, storage_options: dict | None = None,
                 flag: str = "--output"):
        self.url, self.name, self.command, self.doing = url, name, command, doing
        self.storage_options = dict(storage_options or {})
        self.where, self.hint = _where_and_hint(url, flag)
        self.token = os.urandom(8).hex()
        self._stop = None
        self._thread = None
        self._fs, self._path = None, None

    def _body(self) -> bytes:
        import json
        import socket

        return json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": self.command,
                           "doing": self.doing, "token": self.token}).encode()

    def take(self) -> None:
        """Create the lease, take over a dead holder's, or raise naming the live holder."""
        import socket
        import threading

        from draftdata.store.fs import (
            can_replace_if_match,
            describe_storage_error,
            get_fs,
            put_atomic,
            replace_if_match,
        )

        if self._thread is not None:
            return
        try:
            stale = float(os.environ.get(LEASE_STALE_ENV) or LEASE_STALE_S)
        except ValueError:
            raise DraftdataError(f"{LEASE_STALE_ENV}={os.environ[LEASE_STALE_ENV]!r}: expected seconds") from None
        fs, root = get_fs(self.url, self.storage_options)
        path = f"{root.rstrip('/')}/{self.name}"
        self._fs, self._path = fs, path
        try:
            for _ in range(5):
                fs.invalidate_cache(root)
                if put_atomic(fs, path, self._body(), exclusive=True):
                    break
                holder, age, etag = _read_lease(fs, path)
                if holder is None:  # released in between: try again
                    continue
                pid, host = holder.get("pid"), holder.get("host")
                here = host == socket.gethostname() and isinstance(pid, int)
                # A holder on this machine is judged by its process alone (one stopped with Ctrl-Z
                # rewrites nothing but still writes when resumed); one elsewhere by its lease's age.
                if (here and _alive(pid)) or (not here and (age is None or age < stale)):
                    when = f"; rewritten {age:.0f} s ago" if age is not None and not here else ""
                    raise DraftdataError(
                        f"{self.where}: another draftdata {holder.get('command', self.command)} (pid {pid} on "
                        f"{host}) is {holder.get('doing', self.doing)}{when}; {self.hint} (a run killed on another "
                        f"machine leaves its lease {self.url}/{self.name} for {stale:.0f} s, then it is taken over)")
                why = "is no longer running" if here else f"last rewrote it {age:.0f} s ago"
                print(f"draftdata {self.command}: taking over {self.url}/{self.name}: its holder (pid {pid} on "
                      f"{host}) {why}", file=sys.stderr)
                if etag and can_replace_if_match(fs):
                    # Replace exactly the lease that was read: of two runs taking over at once, one wins.
                    if replace_if_match(fs, path, self._body(), etag):
                        break
                    continue  # another run took it first: look again at who holds it now
                fs.rm_file(path)  # other stores: delete, then create (two takers at once may both win)
            else:
                raise DraftdataError(f"{self.where}: could not take the lease {self.url}/{self.name} (other runs "
                                     "keep taking it); wait for them to finish")
        except DraftdataError:
            raise
        except Exception as e:
            raise describe_storage_error(self.url, e) from None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._refresh, name="draftdata-lease", daemon=True)
        self._thread.start()

    def _refresh(self) -> None:
        from draftdata.store.fs import can_replace_if_match, put_atomic, replace_if_match

        fs, path = self._fs, self._path

        def lost(why: str) -> None:
            print(f"draftdata {self.command}: warning: {why}; the duplicate check at the end will say whether "
                  "two runs wrote the same conversations", file=sys.stderr)

        while not self._stop.wait(LEASE_REFRESH_S):
            try:
                holder, _, etag = _read_lease(fs, path)
                if holder is None:  # deleted (by hand, or by a run that took it over and has ended)
                    if not put_atomic(fs, path, self._body(), exclusive=True):
                        lost(f"{self.url}/{self.name} was deleted and another run created it")
                        return
                elif holder.get("token") != self.token:
                    lost(f"another run took over {self.url}/{self.name} (this run could not rewrite it in time)")
                    return
                elif etag and can_replace_if_match(fs):
                    replace_if_match(fs, path, self._body(), etag)  # changed since read: next round says by whom
                else:
                    fs.pipe_file(path, self._body())
            except Exception as e:  # noqa: BLE001 - a network blip: the next round tries again
                print(f"draftdata {self.command}: warning: cannot rewrite the lease {self.url}/{self.name} "
                      f"({type(e).__name__}); retrying", file=sys.stderr)

    def release(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join(timeout=5)
        self._thread = None
        try:
            holder, _, _ = _read_lease(self._fs, self._path)
            if holder is not None and holder.get("token") == self.token:
                self._fs.rm_file(self._path)
        except Exception:  # noqa: BLE001 - unreachable: it goes stale
            pass


def _read_lease(fs, path: str) -> tuple[dict | None, float | None, str | None]:
    """A lease's content, its age in seconds (this machine's clock against the store's timestamp:
    clocks are assumed synced to well within LEASE_STALE_S) and its ETag; (None, None, None) when
    gone. Content that is not a lease reads as {}."""
    import json
    import time

    try:
        info, data = fs.info(path), fs.cat_file(path)
    except FileNotFoundError:
        return None, None, None
    try:
        holder = json.loads(data)
    except ValueError:
        holder = {}
    stamp = info.get("LastModified") or info.get("mtime")
    age = time.time() - stamp.timestamp() if hasattr(stamp, "timestamp") else None
    return holder if isinstance(holder, dict) else {}, age, info.get("ETag")


def _alive(pid: int) -> bool:
    """Whether process `pid` of this machine runs (a killed one its parent has not reaped yet does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def dataset_lock(url: str, command: str, doing: str, storage_options: dict | None = None, *,
                 unlocked_note: str = "", flag: str = "--output") -> DirectoryLock | ObjectLease:
    """The writers' lock of a dataset (COLLECT_LOCK): a POSIX lock on a local one (taken now when
    the directory exists), a lease object on an object store (taken by `take()`)."""
    from draftdata.store.fs import is_local

    if is_local(url):
        return DirectoryLock(url, COLLECT_LOCK, command, doing, unlocked_note, flag=flag)
    return ObjectLease(url, COLLECT_LOCK, command, doing, storage_options, flag=flag)


def lock_holder(url: str, storage_options: dict | None = None) -> str | None:
    """Who holds the dataset's writers' lock now ("collect (pid N)"), without taking it; None
    when nobody does or it cannot be told. For a reader's "no dataset here": a collect writes
    dataset.json only once its model has loaded, minutes after it took the lock."""
    from draftdata.store.fs import get_fs, is_local, local_path

    try:
        if not is_local(url):
            fs, root = get_fs(url, storage_options)
            holder, _, _ = _read_lease(fs, f"{root.rstrip('/')}/{COLLECT_LOCK}")
            if not holder:  # none, or not a lease
                return None
            return f"{holder.get('command', 'collect')} (pid {holder.get('pid')} on {holder.get('host')})"
        path = os.path.join(local_path(url), COLLECT_LOCK)
        st = os.stat(path)
        if (st.st_dev, st.st_ino) in _HELD:
            return f"collect (pid {os.getpid()}, this process)"
        fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # granted: nobody holds it (closing drops ours)
            return None
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EAGAIN):
                return None
            pid, command, _ = _lock_file_holder(fd)
            return f"{command or 'collect'} (pid {pid})"
        finally:
            os.close(fd)
    except Exception:  # noqa: BLE001 - no lock file, unreadable, no such object: nothing to add
        return None
