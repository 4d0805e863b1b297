"""Dataset URLs: local paths, file://, s3://, gs://, memory:// and anything else fsspec knows.

Filesystems are created per process (never inherited through fork: s3fs holds an event loop
and connections that must not cross a fork), and one atomic `put_atomic` is the commit step.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import os
import uuid
from typing import Any

import fsspec

from draftdata.errors import DraftdataError, StorageAccessError

LOCAL_PROTOCOLS = ("file", "local")
# Object stores: prefixes need no directories, and creating one there can create a bucket (s3fs).
BUCKET_PROTOCOLS = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss")


def normalize_url(url: str) -> str:
    """Strip trailing slashes; turn a bare local path into an absolute path."""
    url = str(url).rstrip("/")
    if "://" not in url:
        return os.path.abspath(os.path.expanduser(url))
    return url


LOCAL_PREFIXES = ("file://", "local://")  # fsspec's two spellings of the local file system


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith(LOCAL_PREFIXES)


def local_path(url: str) -> str:
    """The path of a local URL (`file://`, `local://` or bare), `~` expanded as fsspec does."""
    for prefix in LOCAL_PREFIXES:
        if url.startswith(prefix):
            return os.path.expanduser(url[len(prefix):])
    return os.path.expanduser(url)


RAY_UPLOAD_MARKER = f"{os.sep}runtime_resources{os.sep}working_dir_files{os.sep}"


def refuse_relative_in_ray_upload(flag: str, url: str) -> None:
    """Under `ray job submit --working-dir`, the driver runs in Ray's temporary copy of the upload:
    a relative local output would land there and vanish with the Ray session (exit 0 all the same)."""
    if is_local(url) and not os.path.isabs(local_path(url)) and RAY_UPLOAD_MARKER in os.getcwd() + os.sep:
        from draftdata.errors import DraftdataError

        raise DraftdataError(f"{flag} {url}: a relative path inside a Ray job's working directory ({os.getcwd()}) "
                             "would be written into Ray's temporary copy of the upload, which is deleted with the "
                             "session; give an absolute path on a shared file system, or an s3:// URL")


def canonical_location(url: str) -> str:
    """One spelling per location, for locks and keys: a local path resolved (file://, local://, ~,
    relative parts, symlinks), a URL without trailing slashes."""
    if is_local(url):
        return os.path.realpath(local_path(url))
    return url.rstrip("/")


def check_writable_file(path: str, flag: str, example: str = "out") -> None:
    """Refuse a local output FILE that the run could not write at its end (a directory, a file
    where a folder should be, a read-only file system, no permission): checked before any long
    work, and nothing is left behind (a probe file is created and removed in the nearest existing
    folder; an existing file is opened for appending). Object-store URLs are not checked."""
    if not is_local(path):
        return
    local = os.path.abspath(local_path(path))
    if os.path.isdir(local):
        raise DraftdataError(f"{flag} {path}: is a directory; give a file path, e.g. {os.path.join(path, example)}")
    folder = os.path.dirname(local)
    while not os.path.exists(folder):  # the nearest existing folder (the rest is created at the end)
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        raise DraftdataError(f"{flag} {path}: {folder} is a file, not a directory; give another path")
    try:
        if os.path.exists(local):
            with open(local, "ab"):
                pass
        else:
            probe = os.path.join(folder, f".{os.path.basename(local)}.probe-{os.getpid()}")
            with open(probe, "wb"):
                pass
            os.remove(probe)
    except OSError as e:
        raise DraftdataError(f"{flag} {path}: cannot write there ({e.strerror or e} in {folder}); give a "
                             "writable path") from None


def get_fs(url: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for a dataset URL, with one-line errors for unusable URLs."""
    try:
        fs, path = fsspec.core.url_to_fs(url, skip_instance_cache=True, **(storage_options or {}))
    except ImportError as e:
        scheme = url.split("://", 1)[0]
        hint = " (pip install 'draftdata[gcs]')" if scheme in ("gs", "gcs") else ""
        raise StorageAccessError(f"{url}: the {scheme}:// scheme needs a package that is not installed{hint}: {e}") from None
    except ValueError as e:
        raise StorageAccessError(f"{url}: unknown or unsupported URL scheme ({e})") from None
    return fs, path.rstrip("/")


MISSING_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError)
# Packages whose own exception types (not OSError subclasses) mean "could not reach or use the storage".
_STORAGE_PACKAGES = ("botocore", "aiobotocore", "aiohttp", "s3fs", "gcsfs", "google", "requests", "urllib3", "adlfs",
                     "azure")


def is_storage_error(e: BaseException) -> bool:
    """True when `e` is a failure to reach or use the storage (network, timeout, permission, credentials,
    throttling), False for a missing object and for complaints about the stored bytes.

    Readers use this to tell an outage from corruption: decoders (zarr, numcodecs, json) report bad
    bytes as ValueError/RuntimeError/KeyError, while I/O fails with OSError (ConnectionError,
    TimeoutError, PermissionError, ...) or the storage SDK's own exception types. pyarrow also raises
    OSError for undecodable bytes, so the Arrow reader classifies by where the error came from instead.
    """
    if isinstance(e, MISSING_ERRORS):
        return False
    if isinstance(e, (OSError, asyncio.TimeoutError, concurrent.futures.TimeoutError)):
        return True
    return type(e).__module__.split(".")[0] in _STORAGE_PACKAGES


# Local disk errors: what to do, instead of the object-store advice (endpoint, network, credentials).
_GC_HINT = "then `draftdata verify {url} --gc --grace 0` (with no writer running) removes a half-written part"
LOCAL_ERRNO_ADVICE = {
    errno.ENOSPC: f"free disk space or write elsewhere; {_GC_HINT}",
    errno.EDQUOT: f"the disk quota is used up: free space or write elsewhere; {_GC_HINT}",
    errno.EROFS: "the file system is read-only: write to another directory",
    errno.EACCES: "no permission: check the directory's owner and mode, or write elsewhere",
    errno.EPERM: "not permitted: check the directory's owner and mode, or write elsewhere",
}


def describe_storage_error(url: str, e: BaseException) -> DraftdataError:
    """Turn a backend exception (credentials, permissions, endpoint) into a one-line error."""
    if isinstance(e, DraftdataError):
        return e
    name = type(e).__name__
    msg = str(e).splitlines()[0] if str(e) else name
    if isinstance(e, (NotADirectoryError, FileExistsError)):
        return DraftdataError(f"{url}: a file is in the way where a directory is expected ({msg}); give a dataset "
                              "directory, not a file")
    if name in ("NoCredentialsError", "PartialCredentialsError") or "credentials" in msg.lower():
        return StorageAccessError(f"{url}: no usable credentials ({msg}); set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY "
                                  "or pass storage options (key, secret, client_kwargs.endpoint_url)")
    if name == "NoSuchBucket" or "bucket does not exist" in msg.lower():
        return StorageAccessError(f"{url}: the bucket does not exist ({msg}); create it first, or check the URL "
                                  "(draftdata never creates buckets)")
    if is_local(url) and isinstance(e, OSError) and e.errno in LOCAL_ERRNO_ADVICE:
        return StorageAccessError(f"{url}: {e.strerror or msg}; {LOCAL_ERRNO_ADVICE[e.errno].format(url=url)}")
    if isinstance(e, PermissionError) or "AccessDenied" in msg or "Forbidden" in msg:
        return StorageAccessError(f"{url}: access denied ({msg}); check the credentials and bucket policy")
    return StorageAccessError(f"{url}: storage error: {name}: {msg}; check the endpoint, network and storage "
                              "service, then retry")


def put_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes, *, exclusive: bool = False) -> bool:
    """Write `data` so that readers see either nothing or all of it; returns whether it was written.

    Object stores make one PUT atomic; on a file system we write a hidden temporary file in the
    same directory and rename it over the target (atomic on POSIX). `exclusive=True` never
    replaces an existing file: on a file system the temporary file is hard-linked into place,
    which fails if the target exists (returns False). On object stores it is a conditional PUT
    (S3's `If-None-Match: *`, fsspec's `mode="create"`), refused by the store if the key exists;
    a store that does not implement the condition gets a plain PUT, and the caller's read-back
    has to catch a race there.
    """
    if getattr(fs, "protocol", None) and set(_protocols(fs)) & set(LOCAL_PROTOCOLS):
        directory, name = os.path.split(path)
        os.makedirs(directory, exist_ok=True)
        tmp = os.path.join(directory, f".{name}.tmp-{uuid.uuid4().hex}")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if not exclusive:
            os.replace(tmp, path)
            return True
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        except OSError:  # no hard links on this file system (some FUSE/SMB mounts): plain rename
            os.replace(tmp, path)
            return True
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    if exclusive:
        try:
            fs.pipe_file(path, data, mode="create")
            return True
        except FileExistsError:
            return False
        except Exception as e:
            code = _error_code(e)
            # 412 without s3fs's If-None-Match marker, or AWS's 409 for two conditional PUTs in
            # flight: the key exists (or is being created); the caller reads back the winner.
            if code in PRECONDITION_FAILED:
                return False
            if not _condition_unsupported(e, code):
                raise
    fs.pipe_file(path, data)
    return True


PRECONDITION_FAILED = ("PreconditionFailed", "412", "ConditionalRequestConflict", "409")  # a condition's "no"


def can_replace_if_match(fs: fsspec.AbstractFileSystem) -> bool:
    """Whether `replace_if_match` works on `fs` (S3 through s3fs)."""
    return hasattr(fs, "call_s3")


def replace_if_match(fs: fsspec.AbstractFileSystem, path: str, data: bytes, etag: str) -> bool:
    """PUT `data` only if the object's ETag is still `etag` (S3's `If-Match`); False when it
    changed, so that of two writers replacing what they both read, one wins."""
    bucket, key, _ = fs.split_path(path)
    try:
        fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, IfMatch=etag)
    except Exception as e:
        if _error_code(e) in PRECONDITION_FAILED:
            return False
        raise
    fs.invalidate_cache(path)
    return True


def _error_code(e: BaseException) -> str:
    """The storage service's error code (`Error.Code` of a botocore response), or ''."""
    for err in (e, e.__cause__):
        response = getattr(err, "response", None)
        if isinstance(response, dict):
            return str(response.get("Error", {}).get("Code", ""))
    return ""


def _condition_unsupported(e: BaseException, code: str) -> bool:
    """Whether a conditional PUT failed only because the store or client does not implement the
    condition: older S3-compatible servers answer 501 NotImplemented; s3fs before 2024.12 passes
    `mode` on to botocore, and botocore before 1.35.20 lacks IfNoneMatch (ParamValidationError);
    some fsspec backends have no `mode` argument (TypeError)."""
    text = f"{e} {e.__cause__ or ''}"
    if isinstance(e, TypeError) and "mode" in text:
        return True
    if "ParamValidationError" in (type(e).__name__, type(e.__cause__).__name__) or "Unknown parameter" in text:
        return True
    return code in ("NotImplemented", "501") or "NotImplemented" in text or "not implemented" in text.lower()


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    p = fs.protocol
    return (p,) if isinstance(p, str) else tuple(p)


def is_local_fs(fs: fsspec.AbstractFileSystem) -> bool:
    return bool(set(_protocols(fs)) & set(LOCAL_PROTOCOLS))


def is_bucket_fs(fs: fsspec.AbstractFileSystem) -> bool:
    return bool(set(_protocols(fs)) & set(BUCKET_PROTOCOLS))


def parse_storage_options(items: list[str] | None) -> dict[str, Any]:
    """`KEY=VALUE` strings -> fsspec storage options; dotted keys nest, values are JSON when they parse.

    Example: `client_kwargs.endpoint_url=http://127.0.0.1:9000 anon=false`.
    """
    import json

    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise DraftdataError(f"--storage-option {item!r}: expected KEY=VALUE")
        key, value = item.split("=", 1)
        try:
            parsed: Any = json.loads(value)
        except ValueError:
            parsed = value
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = parsed
    return out


def add_storage_option_argument(parser: Any) -> None:
    """The `--storage-option KEY=VALUE` flag every command that opens a dataset URL takes."""
    parser.add_argument("--storage-option", "-S", action="append", default=[], metavar="KEY=VALUE",
                        help="fsspec storage option, repeatable; dotted keys nest "
                             "(e.g. client_kwargs.endpoint_url=http://127.0.0.1:9000). "
                             "S3 credentials also come from the usual AWS environment variables.")


def remove_tree(fs: Any, path: str) -> None:
    """Delete `path` and everything below it by literal key: s3fs's `rm` expands its argument as a
    glob, so a prefix with `[` or `]` in it would match nothing (and a failed commit or gc would
    leave its objects behind)."""
    if is_local_fs(fs):
        fs.rm(path, recursive=True)
        return
    files = list(fs.find(path, withdirs=False))  # a listing by prefix, no glob
    if not files:
        raise FileNotFoundError(path)
    if hasattr(fs, "call_s3"):  # S3: up to 1,000 keys a request (a request per object: minutes for a big gc)
        bucket = files[0].split("/", 1)[0]
        for i in range(0, len(files), DELETE_BATCH):
            keys = [{"Key": f.split("/", 1)[1]} for f in files[i:i + DELETE_BATCH]]
            errors = fs.call_s3("delete_objects", Bucket=bucket, Delete={"Objects": keys, "Quiet": True}).get("Errors")
            if errors:
                raise OSError(f"cannot delete {len(errors)} object(s) under {path}, e.g. {errors[0].get('Key')}: "
                              f"{errors[0].get('Code')} {errors[0].get('Message')}")
    else:
        for f in files:
            fs.rm_file(f)
    fs.invalidate_cache(path)


DELETE_BATCH = 1000  # S3 DeleteObjects' limit


def unfinished_uploads(fs: Any, prefix: str) -> list[tuple[str, str, float | None]]:
    """Multipart uploads under `prefix` ("bucket/key/prefix") that were started and never completed
    or aborted, as (bucket/key, upload id, start time): what a writer killed during a large upload
    (s3fs uploads objects of 100 MiB and more in parts) leaves on S3, invisible to listings but
    stored (and billed). Empty for other file systems."""
    if not hasattr(fs, "call_s3"):
        return []
    bucket, _, key_prefix = prefix.partition("/")
    out: list[tuple[str, str, float | None]] = []
    marker: dict[str, str] = {}
    while True:
        page = fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=key_prefix, **marker)
        for u in page.get("Uploads", []):
            started = u.get("Initiated")
            out.append((f"{bucket}/{u['Key']}", u["UploadId"],
                        started.timestamp() if hasattr(started, "timestamp") else None))
        if not page.get("IsTruncated"):
            return out
        marker = {"KeyMarker": page.get("NextKeyMarker", ""), "UploadIdMarker": page.get("NextUploadIdMarker", "")}


def abort_upload(fs: Any, key: str, upload_id: str) -> None:
    """Abort one unfinished multipart upload (`key` as "bucket/key"), freeing its stored parts."""
    bucket, _, name = key.partition("/")
    fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=name, UploadId=upload_id)
