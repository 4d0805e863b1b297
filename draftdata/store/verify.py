"""Check committed parts against their commit records and the schema; collect crashed writers' garbage."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from draftdata.errors import DraftdataError
from draftdata.store.dataset import Dataset, open_location
from draftdata.store.fs import abort_upload, remove_tree, unfinished_uploads
from draftdata.store.layout import crc32c


def expected_arrays(ds: Dataset, num_tokens: int, num_samples: int) -> dict[str, tuple[str, tuple[int, ...]]]:
    """The stored dtype and shape every array of a part must have under the dataset schema."""
    s = ds.schema
    k, h, t = s.num_aux_slots, s.hidden_size, num_tokens
    hidden_dtype = "uint8" if s.codec == "fp8" else "uint16"
    out = {
        "input_ids": ("int32", (t,)), "loss_mask": ("uint8", (t,)), "offsets": ("int64", (num_samples + 1,)),
        "aux_hidden_states": (hidden_dtype, (t, k * h)), "hidden_states": (hidden_dtype, (t, h)),
    }
    if s.codec == "fp8":
        out["aux_scale"] = ("float32", (t, k))
        out["hidden_scale"] = ("float32", (t, 1))
    return out


def verify_part(ds: Dataset, p: int) -> list[str]:
    """Problems found in part p, one line each naming the part and the array."""
    info = ds.parts[p]
    where = f"part {info.id}"
    problems: list[str] = []
    rec = info.record
    if rec.get("format") != ds.schema.storage_format or rec.get("codec") != ds.schema.codec:
        problems.append(f"{where}: format/codec {rec.get('format')}/{rec.get('codec')} disagree with dataset.json "
                        f"({ds.schema.storage_format}/{ds.schema.codec})")
    off = info.offsets
    if len(off) != info.num_samples + 1 or not len(off) or off[0] != 0 or np.any(np.diff(off) <= 0) \
            or off[-1] != info.num_tokens:
        problems.append(f"{where}: array offsets: not a strictly increasing 0..{info.num_tokens} table "
                        f"for {info.num_samples} samples")
    if len(info.conversation_ids) != info.num_samples:
        problems.append(f"{where}: commit record lists {len(info.conversation_ids)} ids for {info.num_samples} samples")
    expected = expected_arrays(ds, info.num_tokens, info.num_samples)
    recorded = rec.get("arrays", {})
    for name in sorted(set(expected) | set(recorded)):
        if name not in recorded:
            problems.append(f"{where}: array {name}: missing from the commit record")
            continue
        if name not in expected:
            problems.append(f"{where}: array {name}: not part of a {ds.schema.codec} dataset")
            continue
        dtype, shape = expected[name]
        entry = recorded[name] if isinstance(recorded[name], dict) else {}
        if not isinstance(entry.get("dtype"), str) or not isinstance(entry.get("shape"), list):
            problems.append(f"{where}: array {name}: the commit record's entry lacks a dtype or shape "
                            f"({recorded[name]!r})")
            continue
        if entry["dtype"] != dtype or tuple(entry["shape"]) != shape:
            problems.append(f"{where}: array {name}: stored as {entry['dtype']}{tuple(entry['shape'])}, "
                            f"the schema needs {dtype}{shape} (hidden_size={ds.schema.hidden_size}, "
                            f"aux slots={ds.schema.num_aux_slots}, codec={ds.schema.codec})")
    if problems:
        return problems
    try:
        reader = ds.reader(p, whole=True)
    except DraftdataError as e:
        return [str(e) if str(e).startswith(where) else f"{where}: {e}"]
    for name in expected:
        try:
            a = reader.read(name)
        except DraftdataError as e:
            problems.append(str(e) if str(e).startswith(where) else f"{where}: array {name}: {e}")
            continue
        if str(a.dtype) != expected[name][0] or tuple(a.shape) != expected[name][1]:
            problems.append(f"{where}: array {name}: data is {a.dtype}{tuple(a.shape)}, "
                            f"commit record says {expected[name][0]}{expected[name][1]}")
        elif crc32c(a) != info.checksums.get(name):
            problems.append(f"{where}: array {name}: checksum mismatch (crc32c {crc32c(a)} != recorded "
                            f"{info.checksums.get(name)})")
        elif name == "offsets" and not np.array_equal(a, info.offsets):
            # Readers cut samples at the commit record's offsets: the part's own table must agree.
            problems.append(f"{where}: array offsets in the part differ from the commit record's offsets "
                            "(readers would cut samples at the wrong tokens)")
    name_ids = reader.attrs.get("conversation_ids")
    if name_ids is None:
        problems.append(f"{where}: the part's metadata lacks its conversation ids")
    elif list(name_ids) != info.conversation_ids:
        problems.append(f"{where}: conversation ids in the part differ from its commit record")
    return problems


def verify_dataset(ds: Dataset, progress: Callable[[int], Any] | None = None) -> list[str]:
    """All problems of all committed parts, plus conversation ids that occur in more than one place."""
    problems = []
    for p in range(len(ds.parts)):
        problems += verify_part(ds, p)
        if progress:
            progress(1)
    where: dict[str, list[str]] = {}
    for part in ds.parts:
        for cid in part.conversation_ids:
            where.setdefault(cid, []).append(part.id)
    for cid, parts in sorted(where.items()):
        if len(parts) > 1:
            problems.append(f"conversation {cid!r}: stored {len(parts)} times (parts {', '.join(parts)})")
    return problems


def leftovers(url: str, *, storage_options: dict[str, Any] | None = None) -> list[tuple[str, float | None]]:
    """Uncommitted part directories, temporary commit records and (S3) unfinished multipart
    uploads below parts/, each with its age in seconds (None when the backend reports no time):
    crashed writers' garbage, or a running writer's work."""
    return [(path, age) for path, age, _ in _leftovers(url, storage_options)]


def _leftovers(url: str, storage_options: dict[str, Any] | None) -> list[tuple[str, float | None, Callable[[], Any]]]:
    """`leftovers`, each with the call that removes it."""
    loc, _ = open_location(url, storage_options)
    # Every commit file counts, parseable or not: a damaged record's part is still committed data.
    committed = set(loc.list_commits())
    fs, root = loc.fs, loc.root
    now = time.time()
    found: list[tuple[str, float | None, Callable[[], Any]]] = []

    def tree(path: str) -> None:
        newest = _newest_mtime(fs, path)
        found.append((path, None if newest is None else now - newest, lambda: remove_tree(fs, path)))

    parts = f"{root}/parts"
    try:
        entries = fs.ls(parts, detail=True)
    except FileNotFoundError:
        entries = []
    for e in entries:
        path = e["name"].rstrip("/")
        if path == parts:  # an S3 "folder" marker (`parts/`, the console's "Create folder"):
            continue                   # as a tree it is every part of the dataset
        if path.rsplit("/", 1)[-1] not in committed:
            tree(e["name"])
    # Temporary files of an atomic write (a local writer killed between writing and renaming one):
    # commit records, and the dataset.json of a creator killed before linking it into place.
    for folder in (f"{root}/commits", root):
        try:
            for path in fs.ls(folder, detail=False):
                name = path.rstrip("/").rsplit("/", 1)[-1]
                if name.startswith(".") and ".tmp-" in name:
                    tree(path)
        except FileNotFoundError:
            pass
    prefix = f"{root}/parts/"
    try:
        uploads = unfinished_uploads(fs, prefix)
    except (OSError, NotImplementedError):  # no s3:ListBucketMultipartUploads permission, or a store without it
        uploads = []
    for key, upload_id, started in uploads:
        if key[len(prefix):].split("/", 1)[0] not in committed:
            found.append((f"{key} (unfinished upload {upload_id})", None if started is None else now - started,
                          lambda key=key, upload_id=upload_id: abort_upload(fs, key, upload_id)))
    return found


def garbage_collect(url: str, *, storage_options: dict[str, Any] | None = None,
                    grace_seconds: float = 3600.0) -> tuple[list[str], list[str]]:
    """Delete the `leftovers` older than `grace_seconds`; returns (deleted, kept) paths.

    The grace period protects writers that are still running: their parts are uncommitted too,
    and so is anything of unknown age. A running collect holds the dataset's lock (a lease object
    on a store), and gc is refused (DraftdataError naming its pid) until it ends.
    """
    from draftdata.locks import dataset_lock

    # A collect holds this lock (a lease object on a store) while it writes: its part in progress is
    # not a leftover, whatever its age, and no collect starts while this removes parts.
    lock = dataset_lock(url, "verify --gc", "removing crashed writers' leftovers from it", storage_options,
                        unlocked_note="with --grace 0 it would delete a running collect's part in progress", flag="")
    lock.take()
    try:
        deleted, kept = [], []
        for path, age, remove in _leftovers(url, storage_options):
            if age is None or age < grace_seconds:
                kept.append(path)
                continue
            remove()
            deleted.append(path)
    finally:
        lock.release()
    return deleted, kept


def _newest_mtime(fs: Any, path: str) -> float | None:
    """Latest modification time below `path` (the path's own for an empty directory); None when the
    backend reports no time at all, which garbage collection treats as "maybe still being written"."""
    newest: float | None = None
    try:
        infos = list(fs.find(path, detail=True, withdirs=False).values()) if fs.isdir(path) else []
        infos.append(fs.info(path))
    except FileNotFoundError:
        return None
    for info in infos:
        m = info.get("mtime") or info.get("LastModified") or info.get("last_modified") or info.get("created")
        if hasattr(m, "timestamp"):
            m = m.timestamp()
        try:
            if m:
                newest = max(newest or 0.0, float(m))
        except (TypeError, ValueError):
            continue
    return newest
