"""The dataset format: round trips, atomic commits, concurrent writers, corruption, CLI."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from draftdata.config import DatasetSchema
from draftdata.errors import (
    CorruptDataError,
    DatasetNotFoundError,
    DraftdataError,
    SchemaMismatchError,
    StorageAccessError,
)
from draftdata.store import create_dataset, open_dataset
from draftdata.store.dataset import list_entries
from draftdata.store.fs import describe_storage_error
from draftdata.store.verify import garbage_collect, leftovers, verify_dataset

H, K = 32, 3
FP8_REL_ERR = 1 / 8 + 1e-3  # e4m3 has 3 mantissa bits: relative rounding error <= 2^-4, bf16 rounding on top


def schema(**kw) -> DatasetSchema:
    base = dict(base_model_id="tiny", hidden_size=H, aux_layer_ids=[1, 2, 3], num_hidden_layers=4,
                vocab_size=400, max_seq_len=256)
    base.update(kw)
    return DatasetSchema(**base)


def make_sample(i: int, length: int | None = None) -> dict:
    g = torch.Generator().manual_seed(i)
    n = length or 5 + (i * 7) % 40
    return {
        "conversation_id": f"conv-{i}",
        "input_ids": torch.randint(0, 400, (n,), generator=g),
        "loss_mask": torch.randint(0, 2, (n,), generator=g),
        "aux_hidden_states": (torch.randn(n, K * H, generator=g) * 3).to(torch.bfloat16),
        "hidden_states": torch.randn(n, H, generator=g).to(torch.bfloat16),
    }


def write(url, samples, *, fmt="zarr", codec="bf16", per_part=4, opts=None, work_unit=None):
    w = create_dataset(url, schema(), format=fmt, codec=codec, storage_options=opts)
    for start in range(0, len(samples), per_part):
        pw = w.open_part(work_unit=work_unit)
        for s in samples[start:start + per_part]:
            pw.add(s)
        pw.commit()
    return w


def assert_same(got, want, codec):
    assert got["conversation_id"] == want["conversation_id"]
    assert got["input_ids"].dtype == torch.int32 and torch.equal(got["input_ids"], want["input_ids"].int())
    assert torch.equal(got["loss_mask"].long(), want["loss_mask"].long())
    for name in ("aux_hidden_states", "hidden_states"):
        assert got[name].dtype == torch.bfloat16 and got[name].shape == want[name].shape
        if codec == "fp8":
            # error bound: per row and slot, |err| <= rel * amax of that slot
            w = want[name].float()
            slots = K if name == "aux_hidden_states" else 1
            amax = w.view(w.shape[0], slots, -1).abs().amax(-1, keepdim=True)
            err = (got[name].float() - w).view(w.shape[0], slots, -1).abs()
            assert (err <= FP8_REL_ERR * amax + 1e-6).all(), name
        else:
            assert torch.equal(got[name].view(torch.int16), want[name].view(torch.int16)), name


@pytest.mark.parametrize("fmt", ["zarr", "arrow"])
@pytest.mark.parametrize("codec", ["bf16", "zstd", "fp8"])
@pytest.mark.parametrize("where", ["local", "s3"])
def test_round_trip(tmp_path, fmt, codec, where, request):
    if where == "s3":
        bucket, opts = request.getfixturevalue("s3_bucket")
        url = f"{bucket}/ds"
    else:
        url, opts = str(tmp_path / "ds"), None
    samples = [make_sample(i) for i in range(10)]
    write(url, samples, fmt=fmt, codec=codec, opts=opts)
    ds = open_dataset(url, storage_options=opts)
    assert ds.num_samples == 10 and len(ds.parts) == 3
    assert ds.num_tokens == sum(len(s["input_ids"]) for s in samples)
    assert ds.schema.storage_format == fmt and ds.schema.codec == codec
    for i, s in enumerate(samples):
        assert_same(ds.sample(i), s, codec)  # range reads
    for got, want in zip(ds, samples):  # whole-part reads
        assert_same(got, want, codec)
    empty = ds.read_samples(0, 1, 1)  # an empty range (fp8 failed to reshape 0 rows)
    assert empty["aux_hidden_states"].shape == (0, K * H) and empty["hidden_states"].shape == (0, H)
    assert verify_dataset(ds) == []


def test_formats_agree_bit_exactly(tmp_path):
    samples = [make_sample(i) for i in range(6)]
    write(str(tmp_path / "z"), samples, fmt="zarr")
    write(str(tmp_path / "a"), samples, fmt="arrow")
    z, a = open_dataset(str(tmp_path / "z")), open_dataset(str(tmp_path / "a"))
    for i in range(6):
        sz, sa = z.sample(i), a.sample(i)
        for k in ("input_ids", "loss_mask"):
            assert torch.equal(sz[k], sa[k])
        for k in ("aux_hidden_states", "hidden_states"):
            assert torch.equal(sz[k].view(torch.int16), sa[k].view(torch.int16))
    # both formats record the same logical checksums
    assert [p.checksums for p in z.parts] == [p.checksums for p in a.parts]


def test_fp8_decode_in_chunks_equals_the_whole_product():
    """Chunked decoding (bounded float32 scratch) gives the bits of the one-shot float32 product."""
    from draftdata.store.codecs import fp8_decode, fp8_encode

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(37, K * H, generator=g) * torch.logspace(-3, 3, 37).unsqueeze(1)).to(torch.bfloat16)
    q, scale = fp8_encode(x.view(torch.uint16).numpy(), K)
    whole = (torch.from_numpy(q).view(torch.float8_e4m3fn).float().view(37, K, H)
             * torch.from_numpy(scale).unsqueeze(2)).view(37, K * H).to(torch.bfloat16)
    for chunk in (1, K * H * 5, 1 << 20):  # one row at a time, 5 rows (a ragged last chunk), all at once
        assert torch.equal(fp8_decode(q, scale, chunk=chunk).view(torch.int16), whole.view(torch.int16))
    assert fp8_decode(q[:0], scale[:0]).shape == (0, K * H)
    with pytest.raises(ValueError, match="do not fit 36 rows"):
        fp8_decode(q, scale[:36])


def test_memory_url_and_long_sample_spans_chunks():
    url = f"memory://rt-{os.getpid()}/ds"
    big = make_sample(99, length=3000)  # several token-row chunks
    write(url, [make_sample(0), big, make_sample(1)], per_part=3)
    ds = open_dataset(url)
    assert_same(ds.sample(1), big, "bf16")


def test_schema_mismatch_is_refused_with_differences(tmp_path):
    url = str(tmp_path / "ds")
    create_dataset(url, schema())
    with pytest.raises(SchemaMismatchError) as e:
        create_dataset(url, schema(hidden_size=64, aux_layer_ids=[1, 2]))
    assert "hidden_size" in str(e.value) and "aux_layer_ids" in str(e.value)
    with pytest.raises(SchemaMismatchError, match="codec"):
        create_dataset(url, schema(), codec="fp8")
    w = create_dataset(url, schema())  # same schema: reopens
    pw = w.open_part()
    bad = make_sample(0)
    bad["hidden_states"] = torch.zeros(len(bad["input_ids"]), H + 1, dtype=torch.bfloat16)
    with pytest.raises(SchemaMismatchError, match="conv-0: hidden_states"):
        pw.add(bad)


def test_uncommitted_part_is_invisible_and_abort_cleans(tmp_path):
    url = str(tmp_path / "ds")
    w = write(url, [make_sample(i) for i in range(4)])
    pw = w.open_part()
    pw.add(make_sample(10))
    ds = open_dataset(url)
    assert ds.num_samples == 4
    pw.abort()
    assert not (tmp_path / "ds" / "parts" / pw.part_id).exists()
    assert w.committed_ids() == {f"conv-{i}" for i in range(4)}


def _kill_target(url: str, ready: str) -> None:
    """Writes one part's data, then hangs before the commit record (killed from outside)."""
    from draftdata.store import dataset as dsmod

    w = create_dataset(url, schema())
    pw = w.open_part()
    for i in range(100, 104):
        pw.add(make_sample(i))
    real_put = dsmod.put_atomic

    def hang(fs, path, data):
        Path(ready).write_text("data written")
        time.sleep(600)
        real_put(fs, path, data)

    dsmod.put_atomic = hang
    pw.commit()


def test_sigkill_mid_part_leaves_nothing_visible_and_gc_cleans(tmp_path):
    url = str(tmp_path / "ds")
    write(url, [make_sample(i) for i in range(4)])
    ready = tmp_path / "ready"
    proc = mp.get_context("spawn").Process(target=_kill_target, args=(url, str(ready)))
    proc.start()
    deadline = time.time() + 120
    while not ready.exists() and time.time() < deadline:
        time.sleep(0.05)
    assert ready.exists(), "writer never reached the commit step"
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    parts_dir = tmp_path / "ds" / "parts"
    assert len(list(parts_dir.iterdir())) == 2  # the committed part + the killed writer's garbage
    ds = open_dataset(url)
    assert ds.num_samples == 4 and verify_dataset(ds) == []
    # verify says the leftover is there and how to remove it (it is not a problem: exit 0)
    out = subprocess.run([sys.executable, "-m", "draftdata.cli", "verify", url], capture_output=True, text=True)
    assert out.returncode == 0 and "note: 1 uncommitted leftover(s)" in out.stderr and "--gc" in out.stderr
    # a young leftover survives the default grace period (it could be a running writer), and says so ...
    ((path, age),) = leftovers(url)
    assert age < 3600 and garbage_collect(url) == ([], [path])
    out = subprocess.run([sys.executable, "-m", "draftdata.cli", "verify", url, "--gc"], capture_output=True, text=True)
    assert "removed 0 leftover(s)" in out.stderr and "kept 1 younger than --grace 3600 s" in out.stderr
    # ... and the CLI removes it with --grace 0; the dataset still verifies
    out = subprocess.run([sys.executable, "-m", "draftdata.cli", "verify", url, "--gc", "--grace", "0"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "removed 1 leftover(s) of crashed writers" in out.stderr
    assert len(list(parts_dir.iterdir())) == 1


def test_gc_removes_the_temporary_dataset_json_of_a_killed_creator(tmp_path):
    """A creator killed between writing dataset.json's temporary file and linking it into place
    left `.dataset.json.tmp-<hex>` in the dataset's root, which no rerun or gc ever removed."""
    url = str(tmp_path / "ds")
    write(url, [make_sample(i) for i in range(2)])
    stale = tmp_path / "ds" / ".dataset.json.tmp-0123456789abcdef"
    stale.write_bytes((tmp_path / "ds" / "dataset.json").read_bytes())
    assert [path for path, _ in leftovers(url)] == [str(stale)]
    assert garbage_collect(url) == ([], [str(stale)])  # young: maybe a creator still running
    assert garbage_collect(url, grace_seconds=0) == ([str(stale)], [])
    assert not stale.exists() and open_dataset(url).num_samples == 2 and leftovers(url) == []


def _concurrent_writer(url: str, worker: int) -> None:
    w = create_dataset(url, schema(), format="arrow")
    for part in range(3):
        pw = w.open_part(work_unit=f"w{worker}-p{part}")
        for i in range(5):
            pw.add(make_sample(1000 * worker + 10 * part + i))
        pw.commit()


def test_four_processes_write_one_dataset(tmp_path):
    url = str(tmp_path / "ds")
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_concurrent_writer, args=(url, w)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
        assert p.exitcode == 0
    ds = open_dataset(url)
    assert len(ds.parts) == 12 and ds.num_samples == 60
    by_id = {s["conversation_id"]: s for s in ds}
    for w in range(4):
        for part in range(3):
            for i in range(5):
                n = 1000 * w + 10 * part + i
                assert_same(by_id[f"conv-{n}"], make_sample(n), "bf16")
    assert verify_dataset(ds) == []


def _flip_one_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("fmt", ["zarr", "arrow"])
def test_flipped_byte_found_by_verify_and_by_reading(tmp_path, fmt):
    url = str(tmp_path / "ds")
    write(url, [make_sample(i, length=50) for i in range(4)], fmt=fmt, per_part=4)
    ds = open_dataset(url)
    part = ds.parts[0]
    if fmt == "zarr":
        target = next((tmp_path / "ds" / "parts" / part.id / "aux_hidden_states" / "c").rglob("*"))
        while target.is_dir():
            target = next(target.iterdir())
        _flip_one_byte(target, 1000)
    else:
        target = tmp_path / "ds" / "parts" / part.id / "part.arrow"
        raw = target.read_bytes()
        # flip a byte inside the hidden-state data of the first record batch (past the schema message)
        _flip_one_byte(target, len(raw) // 2)
    out = subprocess.run([sys.executable, "-m", "draftdata.cli", "verify", url], capture_output=True, text=True)
    assert out.returncode == 1
    assert f"part {part.id}" in out.stdout
    with pytest.raises(CorruptDataError) as e:
        fresh = open_dataset(url)
        for i in range(fresh.num_samples):
            fresh.sample(i)
    assert part.id in str(e.value) and "conversation 'conv-" in str(e.value)


def test_part_disagreeing_with_schema_is_named(tmp_path):
    url = str(tmp_path / "ds")
    write(url, [make_sample(i) for i in range(3)])
    ds = open_dataset(url)
    pid = ds.parts[0].id
    schema_path = tmp_path / "ds" / "dataset.json"
    d = json.loads(schema_path.read_text())
    d["hidden_size"] = 48
    schema_path.write_text(json.dumps(d))
    out = subprocess.run([sys.executable, "-m", "draftdata.cli", "verify", url], capture_output=True, text=True)
    assert out.returncode == 1
    assert f"part {pid}: array hidden_states" in out.stdout and "hidden_size=48" in out.stdout
    # reads through the store API check too, in both formats, for a sample, a part and a range
    for fmt in ("zarr", "arrow"):
        other = str(tmp_path / f"ds-{fmt}")
        write(other, [make_sample(i) for i in range(3)], fmt=fmt)
        meta = json.loads((tmp_path / f"ds-{fmt}" / "dataset.json").read_text())
        meta["aux_layer_ids"] = meta["aux_layer_ids"][:-1]               # one aux slot fewer than stored
        meta["num_aux_slots"] -= 1
        (tmp_path / f"ds-{fmt}" / "dataset.json").write_text(json.dumps(meta))
        bad = open_dataset(other)
        for read, args in ((bad.sample, (0,)), (bad.read_part, (0,)), (bad.read_samples, (0, 0, 1))):
            with pytest.raises(CorruptDataError, match=f"part {bad.parts[0].id}: array aux_hidden_states has rows "
                               r"\d+ wide, as its commit record says, but dataset.json implies \d+ .*does not "
                               "describe this dataset"):
                read(*args)


def test_dataset_json_without_its_codec_or_format_is_named_not_misread(tmp_path):
    """A dataset.json that lost `codec` / `storage_format` (hand edits) read as bf16 / zarr with the
    defaults, and failed later with a shape error or "cannot open Zarr group"; the commit records
    say what each part holds, and opening the dataset now names the difference."""
    url = str(tmp_path / "ds")
    write(url, [make_sample(i) for i in range(3)], fmt="arrow", codec="fp8")
    schema_path = tmp_path / "ds" / "dataset.json"
    d = json.loads(schema_path.read_text())
    del d["codec"], d["storage_format"]
    schema_path.write_text(json.dumps(d))
    with pytest.raises(CorruptDataError, match=r"stored with storage_format 'arrow' \(dataset.json: 'zarr'\), "
                                               r"codec 'fp8' \(dataset.json: 'bf16'\).*lacks or misstates"):
        open_dataset(url)
    out = subprocess.run([sys.executable, "-m", "draftdata.cli", "verify", url], capture_output=True, text=True)
    assert out.returncode == 1 and "codec 'fp8' (dataset.json: 'bf16')" in out.stdout + out.stderr


def test_format_md_reading_sketch_reads_a_dataset_and_an_empty_one(tmp_path, monkeypatch):
    """docs/FORMAT.md's reader without draftdata, run as printed: a part's first sample's final states,
    and no parts (no error) for a dataset with nothing committed yet."""
    text = (Path(__file__).parent.parent / "docs" / "FORMAT.md").read_text()
    code = text.split("```python\n")[-1].split("```")[0]
    monkeypatch.chdir(tmp_path)
    write("ds", [make_sample(i) for i in range(6)], per_part=3)
    (tmp_path / "ds" / "commits" / "stray.json.bak").write_text("{}")           # not a commit record
    scope: dict = {}
    exec(code, scope)
    ds = open_dataset("ds")                          # the loop ends on the last part's first sample
    first = next(iter(ds.iter_part(len(ds.parts) - 1)))
    assert scope["rec"]["conversation_ids"][0] == first["conversation_id"]
    assert np.array_equal(scope["f32"], first["hidden_states"].float().numpy())
    shutil.rmtree(tmp_path / "ds")
    create_dataset("ds", schema())
    scope = {}
    exec(code, scope)
    assert "rec" not in scope


@pytest.mark.parametrize("fmt", ["zarr", "arrow"])
def test_zstd_sees_a_whole_chunk(tmp_path, fmt):
    """zstd found no repeat farther apart than Blosc's default block (32-64 KiB at level 3; Zarr) or
    zstd level 1's 512 KiB window (pyarrow's default level; Arrow): on real SmolLM2 states that
    stored 0.76 / 0.78 of raw, now 0.70 / 0.71. A ~1 MiB chunk whose last quarter repeats rows
    768 KiB back compresses by that quarter."""
    h, n = 512, 341                                      # 3 KiB aux rows: one chunk of 341 rows

    def stored(name, repeat):
        aux = (torch.randn(n, 3 * h, generator=torch.Generator().manual_seed(0)) * 3).to(torch.bfloat16)
        if repeat:
            aux[256:] = aux[:n - 256]
        w = create_dataset(str(tmp_path / name), schema(hidden_size=h), format=fmt, codec="zstd")
        pw = w.open_part()
        pw.add({"conversation_id": "a", "input_ids": torch.zeros(n, dtype=torch.long),
                "loss_mask": torch.ones(n, dtype=torch.long), "aux_hidden_states": aux,
                "hidden_states": torch.zeros(n, h, dtype=torch.bfloat16)})
        pw.commit()
        ds = open_dataset(str(tmp_path / name))
        assert torch.equal(ds.sample(0)["aux_hidden_states"], aux)
        return ds.stored_bytes

    assert stored("repeated", True) < 0.8 * stored("random", False)


def test_inspect_json_and_errors(tmp_path, s3_bucket):
    url = str(tmp_path / "ds")
    write(url, [make_sample(i, length=20) for i in range(5)], codec="zstd")
    out = subprocess.run([sys.executable, "-m", "draftdata.cli", "inspect", url, "--json"],
                         capture_output=True, text=True, check=True)
    info = json.loads(out.stdout)
    for key in ("samples", "tokens", "parts", "stored_bytes", "raw_bytes", "bytes_per_token", "schema"):
        assert key in info
    assert info["samples"] == 5 and info["tokens"] == 100 and info["parts"] == 2
    assert info["raw_bytes"] == 100 * (2 * (K + 1) * H + 5)
    assert info["schema"]["codec"] == "zstd" and info["schema"]["aux_layer_ids"] == [1, 2, 3]
    # `draftdata inspect DS | head`: a reader that leaves early gets no traceback from us
    closed = subprocess.Popen([sys.executable, "-m", "draftdata.cli", "inspect", url], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
    closed.stdout.close()
    err = closed.stderr.read().decode()
    assert closed.wait() == 1 and "Traceback" not in err and "BrokenPipeError" not in err, err

    def one_line_error(*args):
        r = subprocess.run([sys.executable, "-m", "draftdata.cli", *args], capture_output=True, text=True)
        assert r.returncode == 2, r.stdout + r.stderr
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        return r.stderr

    assert "no dataset here" in one_line_error("inspect", str(tmp_path / "missing"))
    (tmp_path / "notds").mkdir()
    (tmp_path / "notds" / "dataset.json").write_text("{\"hello\": 1}")
    assert "not a draftdata dataset" in one_line_error("inspect", str(tmp_path / "notds"))
    assert "unknown or unsupported URL scheme" in one_line_error("inspect", "nosuch://x/y")
    bucket, opts = s3_bucket
    endpoint = opts["client_kwargs"]["endpoint_url"]
    r = subprocess.run([sys.executable, "-m", "draftdata.cli", "inspect", f"{bucket}/ds",
                        "-S", f"client_kwargs.endpoint_url={endpoint}"], capture_output=True, text=True,
                       env={**{k: v for k, v in os.environ.items() if not k.startswith("AWS_")},
                            "HOME": str(tmp_path / "home")})
    assert r.returncode == 2 and "no usable credentials" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_missing_dataset_errors():
    with pytest.raises(DatasetNotFoundError):
        open_dataset("memory://nothing/here")
    with pytest.raises(StorageAccessError):
        open_dataset("nosuch://x")


def one_line_cli_error(capsys, *args: str) -> str:
    """Run `draftdata ARGS` in this process; assert it fails with exactly one line and return it."""
    from draftdata.cli import main

    assert main(list(args)) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_a_file_given_as_dataset_is_named_as_a_file(tmp_path, capsys):
    conv = tmp_path / "conv.jsonl"
    conv.write_text("{}\n")
    for args in (["inspect", str(conv)], ["verify", str(conv)], ["inspect", f"{conv}/sub"]):
        err = one_line_cli_error(capsys, *args)
        assert f"{conv} is a file, not a dataset directory" in err and "storage error" not in err, err
    with pytest.raises(DraftdataError, match="is a file, not a dataset directory"):
        create_dataset(str(conv), schema())
    with pytest.raises(DraftdataError, match="is a file, not a dataset directory"):
        list_entries(str(conv))
    assert "storage error" not in str(describe_storage_error("x", NotADirectoryError(20, "Not a directory")))


def test_local_disk_errors_get_local_advice(tmp_path):
    """A full or read-only local disk is not a network problem: the message says what to do there;
    object stores keep the endpoint/network advice."""
    import errno

    url = str(tmp_path / "ds")
    full = str(describe_storage_error(url, OSError(errno.ENOSPC, "No space left on device")))
    assert f"{url}: No space left on device; free disk space" in full
    assert f"draftdata verify {url} --gc --grace 0" in full and "network" not in full
    ro = str(describe_storage_error(f"file://{url}", OSError(errno.EROFS, "Read-only file system")))
    assert "the file system is read-only: write to another directory" in ro and "network" not in ro
    denied = str(describe_storage_error(url, PermissionError(errno.EACCES, "Permission denied")))
    assert "check the directory's owner and mode" in denied and "bucket policy" not in denied
    remote = str(describe_storage_error("s3://b/ds", OSError(errno.ENOSPC, "No space left on device")))
    assert "check the endpoint, network and storage service" in remote


def test_object_listed_as_itself_is_a_file_and_entries_skip_hidden_names():
    import fsspec

    base = f"memory://entries-{os.getpid()}"
    fs = fsspec.filesystem("memory")
    fs.pipe(f"{base}/conv.jsonl", b"{}\n")
    fs.pipe(f"{base}/ds/.dataset.json.tmp-1", b"")
    fs.pipe(f"{base}/ds/config.json", b"{}")
    with pytest.raises(DraftdataError, match="is a file, not a dataset directory"):
        list_entries(f"{base}/conv.jsonl")
    assert list_entries(f"{base}/ds") == ["config.json"]
    assert list_entries(f"{base}/nothing") == []


def test_s3_folder_marker_is_not_an_entry(s3_bucket):
    """The S3 console's "Create folder" leaves a zero-byte `prefix/` object: still an empty place."""
    import boto3

    bucket, opts = s3_bucket
    boto3.client("s3", endpoint_url=opts["client_kwargs"]["endpoint_url"], aws_access_key_id="testing",
                 aws_secret_access_key="testing", region_name="us-east-1").put_object(
        Bucket=bucket[len("s3://"):], Key="ds/", Body=b"")
    assert list_entries(f"{bucket}/ds", opts) == []
    # inside a dataset, a `parts/` marker is no crashed writer's leftover: gc removed it as a tree,
    # that is every committed part
    url = f"{bucket}/full"
    write(url, [make_sample(i) for i in range(4)], opts=opts)
    boto3.client("s3", endpoint_url=opts["client_kwargs"]["endpoint_url"], aws_access_key_id="testing",
                 aws_secret_access_key="testing", region_name="us-east-1").put_object(
        Bucket=bucket[len("s3://"):], Key="full/parts/", Body=b"")
    assert leftovers(url, storage_options=opts) == []
    assert garbage_collect(url, storage_options=opts, grace_seconds=0) == ([], [])
    ds = open_dataset(url, storage_options=opts)
    assert ds.num_samples == 4 and verify_dataset(ds) == []


@pytest.mark.parametrize("fmt", ["zarr", "arrow"])
def test_s3_gc_removes_leftovers_under_brackets_and_unfinished_uploads(s3_bucket, fmt):
    """On S3: a crashed writer's objects below a prefix with `[`/`]` (s3fs's `rm` globbed the path,
    matched nothing and gc crashed), and a multipart upload a writer killed during a large object
    left open (listed by no listing, still stored): verify notes both, gc removes both."""
    import boto3
    import fsspec

    bucket, opts = s3_bucket
    url = f"{bucket}/run[1]/ds"
    write(url, [make_sample(i) for i in range(4)], fmt=fmt, opts=opts)
    fs = fsspec.filesystem("s3", **opts)
    root = url[len("s3://"):]
    (committed,) = open_dataset(url, storage_options=opts).parts
    for f in fs.find(f"{root}/parts/{committed.id}", withdirs=False):  # a copy without a commit record
        fs.cp_file(f, f.replace(committed.id, "1700000000000-deadbeef0000"))
    s3 = boto3.client("s3", endpoint_url=opts["client_kwargs"]["endpoint_url"], aws_access_key_id="testing",
                      aws_secret_access_key="testing", region_name="us-east-1")
    name = bucket[len("s3://"):]
    key = "run[1]/ds/parts/1700000000001-deadbeef0001/part.arrow"
    upload = s3.create_multipart_upload(Bucket=name, Key=key)["UploadId"]
    s3.upload_part(Bucket=name, Key=key, UploadId=upload, PartNumber=1, Body=b"x" * 1024)
    found = sorted(path for path, _ in leftovers(url, storage_options=opts))
    assert found == [f"{root}/parts/1700000000000-deadbeef0000", f"{name}/{key} (unfinished upload {upload})"]
    deleted, kept = garbage_collect(url, storage_options=opts, grace_seconds=0)
    assert sorted(deleted) == found and kept == []
    assert s3.list_multipart_uploads(Bucket=name).get("Uploads", []) == []
    fs.invalidate_cache()
    assert {f.split("/parts/")[1].split("/")[0] for f in fs.find(f"{root}/parts", withdirs=False)} == {committed.id}
    assert leftovers(url, storage_options=opts) == [] and open_dataset(url, storage_options=opts).num_samples == 4


def test_local_arrow_part_that_is_not_a_file_is_corruption(tmp_path):
    """Damage on local disk (part.arrow replaced by a directory) is corruption, which
    on_corrupt="skip" reads around, not a storage outage."""
    url = str(tmp_path / "ds")
    write(url, [make_sample(i) for i in range(4)], fmt="arrow")
    victim = open_dataset(url).parts[0]
    target = tmp_path / "ds" / "parts" / victim.id / "part.arrow"
    target.unlink()
    target.mkdir()
    with pytest.raises(CorruptDataError, match="part.arrow is not a file"):
        open_dataset(url).sample(0)


@pytest.mark.parametrize("content, expect", [
    ({"format": "draftdata", "format_version": 99}, "unsupported format_version 99"),
    ({**schema().to_dict(), "format_version": "1"}, "unsupported format_version '1'"),
    ({"format": "draftdata", "format_version": 1, "hidden_size": 32},
     "missing field(s) base_model_id, aux_layer_ids, num_hidden_layers, vocab_size, max_seq_len"),
    ({k: v for k, v in schema().to_dict().items() if k != "format_version"}, "missing field(s) format_version"),
    ({**schema().to_dict(), "hidden_size": "32", "aux_layer_ids": [1, "2"]},
     "malformed field(s): hidden_size is '32'; aux_layer_ids is [1, '2']"),
    ({**schema().to_dict(), "extra": []}, "malformed field(s): extra is []"),
    # values FORMAT.md does not allow were used as they were ("false" read as pre-norm, and trained so)
    ({**schema().to_dict(), "final_hidden_prenorm": "false"},
     "malformed field(s): final_hidden_prenorm is 'false' (expected true or false)"),
    ({**schema().to_dict(), "layer_id_convention": "hf_hidden_states_index", "hidden_dtype": "float16",
      "loss_mask": "weird"}, "malformed field(s): layer_id_convention is 'hf_hidden_states_index' (expected "
     '"decoder_layer_output_0based"); hidden_dtype is \'float16\' (expected "bfloat16"); loss_mask is \'weird\' '
     '(expected "assistant" or "all")'),
    ({**schema().to_dict(), "aux_layer_ids": [2, 1]},
     "malformed field(s): aux_layer_ids is [2, 1] (expected distinct ascending layer ids in [0, num_hidden_layers))"),
    ({**schema().to_dict(), "num_aux_slots": 2}, "malformed field(s): num_aux_slots is 2 but aux_layer_ids has 3 ids"),
    ({**schema().to_dict(), "max_seq_len": 0}, "malformed field(s): max_seq_len is 0 (expected a positive integer)"),
])
def test_malformed_dataset_json_is_one_line_naming_file_and_problem(tmp_path, capsys, content, expect):
    (tmp_path / "ds").mkdir()
    path = tmp_path / "ds" / "dataset.json"
    path.write_text(json.dumps(content))
    err = one_line_cli_error(capsys, "inspect", str(tmp_path / "ds"))
    assert f"{path}: {expect}" in err and "TypeError" not in err, err
    assert "collect again into a new directory" in err


def test_a_schema_that_breaks_the_format_is_refused_before_anything_is_written(tmp_path):
    """create_dataset wrote dataset.json unchecked and read it back through the checks: a bad schema
    left a dataset.json that nothing could open, a later correct schema included."""
    url = str(tmp_path / "ds")
    with pytest.raises(DraftdataError, match=r"cannot create a dataset with this schema: aux_layer_ids is \[3, 1\]"):
        create_dataset(url, schema(aux_layer_ids=[3, 1]))
    assert not (tmp_path / "ds" / "dataset.json").exists()
    create_dataset(url, schema())                        # the correct schema is fine afterwards
    assert open_dataset(url).schema.aux_layer_ids == schema().aux_layer_ids


def test_stored_over_raw_is_close_to_one_for_raw_bf16(tmp_path):
    url = str(tmp_path / "ds")
    samples = [make_sample(i, length=300) for i in range(20)]
    write(url, samples, per_part=20, fmt="zarr")
    ds = open_dataset(url)
    raw = ds.num_tokens * (2 * (K + 1) * H + 5)
    data_bytes = ds.stored_bytes
    assert data_bytes / raw < 1.02  # small parts carry a few KiB of metadata; the bench measures real sizes
    assert np.array_equal(ds.sample_lengths(), [300] * 20)


def test_polling_sees_parts_committed_by_other_writers(s3_bucket):
    """committed_parts() lists afresh each call: s3fs caches listings, and a driver polling a dataset
    (the Ray collect driver) must see the parts other writers committed since its last poll."""
    bucket, opts = s3_bucket
    url = f"{bucket}/poll"
    driver = create_dataset(url, schema(), storage_options=opts)
    worker = create_dataset(url, schema(), storage_options=opts)

    def commit(i: int) -> None:
        pw = worker.open_part(work_unit=f"unit-{i}")
        pw.add(make_sample(i))
        pw.commit()

    commit(0)
    first = driver.committed_parts()
    assert [p.work_unit for p in first] == ["unit-0"]
    commit(1)
    commit(2)
    assert sorted(p.work_unit for p in driver.committed_parts()) == ["unit-0", "unit-1", "unit-2"]
    assert sorted(p.work_unit for p in driver.committed_parts(known={first[0].id})) == ["unit-1", "unit-2"]


def test_remote_arrow_whole_part_reads_are_not_kept(tmp_path):
    """A whole-part read of a remote Arrow part downloads the file; nothing may keep it once the
    caller drops the arrays, or a loader's memory grows past prefetch_bytes with every part read."""
    import gc
    import tracemalloc

    url = f"memory://wholecache-{os.getpid()}/ds"
    write(url, [make_sample(i, length=1000) for i in range(24)], fmt="arrow", per_part=4)  # ~1 MiB per part
    ds = open_dataset(url)
    part_bytes = ds.parts[0].stored_bytes
    tracemalloc.start()
    try:
        for p in range(len(ds.parts)):
            rows = ds.read_part(p)
            assert rows["conversation_ids"] == ds.parts[p].conversation_ids
            del rows
        gc.collect()
        kept, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert kept < part_bytes, f"{kept} bytes still held after reading {len(ds.parts)} parts of {part_bytes} bytes"
    assert_same(ds.sample(5), make_sample(5, length=1000), "bf16")  # range reads still work


@pytest.mark.parametrize("fmt", ["zarr", "arrow"])
def test_all_zero_arrays_are_stored_and_read(tmp_path, fmt):
    """An array that is entirely the fill value (a part without assistant tokens: loss_mask all 0)
    is still stored as one shard, so the part reads back and verifies."""
    url = str(tmp_path / "ds")
    samples = [make_sample(i, length=20) for i in range(3)]
    for s in samples:
        s["loss_mask"] = torch.zeros(20, dtype=torch.uint8)
    write(url, samples, fmt=fmt, per_part=3)
    ds = open_dataset(url)
    if fmt == "zarr":
        assert (tmp_path / "ds" / "parts" / ds.parts[0].id / "loss_mask" / "c" / "0").is_file()
    assert_same(ds.sample(1), samples[1], "bf16")
    for got, want in zip(ds, samples):
        assert_same(got, want, "bf16")
    assert verify_dataset(ds) == []


@pytest.mark.parametrize("fmt", ["zarr", "arrow"])
def test_dataset_path_with_glob_characters(tmp_path, fmt):
    """Paths are read as given: `[`, `]`, `*` in a dataset path are not glob patterns."""
    samples = [make_sample(i) for i in range(6)]
    for url in (str(tmp_path / "run[1]" / "ds*"), f"memory://glob-{fmt}-{os.getpid()}/run[2]"):
        write(url, samples, fmt=fmt, per_part=3)
        ds = open_dataset(url)
        assert len(ds.parts) == 2
        got = {s["conversation_id"]: s for s in ds}  # parts committed in the same millisecond sort randomly
        for want in samples:
            assert_same(got[want["conversation_id"]], want, "bf16")
        one = ds.sample(4)  # a range read
        assert_same(one, samples[int(one["conversation_id"].removeprefix("conv-"))], "bf16")
        assert verify_dataset(ds) == []


def test_malformed_commit_record_is_named(tmp_path):
    """A commit record with missing or mistyped fields raises CorruptDataError naming the part and
    the record file (not a bare KeyError/TypeError); `draftdata verify` reports it and checks the rest."""
    url = str(tmp_path / "ds")
    write(url, [make_sample(i) for i in range(8)], per_part=4)
    ds = open_dataset(url)
    pid = ds.parts[0].id
    record = tmp_path / "ds" / "commits" / f"{pid}.json"
    good = json.loads(record.read_text())
    for bad in ({k: v for k, v in good.items() if k != "arrays"}, None, [1, 2], {**good, "num_samples": "four"},
                {**good, "conversation_ids": "conv-0"}, {**good, "offsets": [[0, 1]]}, {**good, "part_id": "other"}):
        record.write_text(json.dumps(bad))
        with pytest.raises(CorruptDataError) as e:
            open_dataset(url)
        assert f"part {pid}" in str(e.value) and str(record) in str(e.value), str(e.value)
    record.write_text("{not json")
    with pytest.raises(CorruptDataError, match="commit record"):
        open_dataset(url)
    record.write_text(json.dumps({k: v for k, v in good.items() if k != "offsets"}))
    out = subprocess.run([sys.executable, "-m", "draftdata.cli", "verify", url], capture_output=True, text=True)
    assert out.returncode == 1, out.stdout + out.stderr
    assert f"part {pid}: commit record {record} is malformed (missing field 'offsets')" in out.stdout
    assert "Traceback" not in out.stderr
    bad_records: list[str] = []
    rest = open_dataset(url, bad_records=bad_records)
    assert len(bad_records) == 1 and [p.id for p in rest.parts] == [ds.parts[1].id]
    assert verify_dataset(rest) == []


def test_part_ids_of_one_process_sort_in_creation_order():
    """Parts opened within one millisecond still sort in the order they were opened (the dataset's
    sample order follows part ids)."""
    from draftdata.store.dataset import new_part_id

    ids = [new_part_id() for _ in range(200)]
    assert ids == sorted(ids) and len(set(i.split("-")[0] for i in ids)) == 200


def test_dataset_json_is_created_exclusively_on_a_file_system(tmp_path):
    """Of two creators racing on local disk, only one writes dataset.json; the other reads the
    winner's schema back and is refused if it differs (no silent overwrite, no temporary left)."""
    import fsspec

    from draftdata.store.fs import put_atomic

    fs = fsspec.filesystem("file")
    target = str(tmp_path / "dataset.json")
    assert put_atomic(fs, target, b"first", exclusive=True)
    assert not put_atomic(fs, target, b"second", exclusive=True)
    assert (tmp_path / "dataset.json").read_bytes() == b"first"
    assert put_atomic(fs, target, b"third")                        # the default replaces
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dataset.json"]


def test_dataset_json_is_created_exclusively_on_s3(s3_bucket):
    """On S3 the create is a conditional PUT: a second creator's dataset.json is refused by the
    store, not written over the first (moto implements If-None-Match like AWS)."""
    from draftdata.store.fs import get_fs, put_atomic

    bucket, opts = s3_bucket
    fs, root = get_fs(f"{bucket}/ds", opts)
    target = f"{root}/dataset.json"
    assert put_atomic(fs, target, b"first", exclusive=True)
    assert not put_atomic(fs, target, b"second", exclusive=True)
    assert fs.cat_file(target) == b"first"
    assert put_atomic(fs, target, b"third") and fs.cat_file(target) == b"third"


@pytest.mark.parametrize("codec", ["bf16", "fp8"])
def test_remote_arrow_range_reads_fetch_each_block_once(s3_bucket, monkeypatch, codec):
    """A range read of a remote Arrow part fetches about the bytes of the rows it returns: each
    record batch is read once for all its arrays (it was fetched once per array, 4-6x the bytes)."""
    import s3fs

    bucket, opts = s3_bucket
    url = f"{bucket}/wide"
    wide = dict(hidden_size=576, aux_layer_ids=[1, 2, 3])
    w = create_dataset(url, schema(**wide), format="arrow", codec=codec, storage_options=opts)
    pw = w.open_part()
    g = torch.Generator().manual_seed(0)
    for i in range(12):
        pw.add({"conversation_id": f"c{i}", "input_ids": torch.randint(0, 400, (500,), generator=g),
                "loss_mask": torch.ones(500, dtype=torch.long),
                "aux_hidden_states": torch.randn(500, 3 * 576, generator=g).to(torch.bfloat16),
                "hidden_states": torch.randn(500, 576, generator=g).to(torch.bfloat16)})
    pw.commit()
    ds = open_dataset(url, storage_options=opts)
    fetched = []
    real = s3fs.core.S3File._fetch_range
    monkeypatch.setattr(s3fs.core.S3File, "_fetch_range", lambda self, a, b: fetched.append(b - a) or real(self, a, b))
    rows = ds.read_samples(0, 2, 10)
    assert rows["aux_hidden_states"].shape == (4000, 3 * 576)
    row_bytes = (4 * 576 * (1 if codec == "fp8" else 2)) + 5
    returned = 4000 * row_bytes
    assert sum(fetched) < 1.3 * returned + (4 << 20), (sum(fetched), returned)


@pytest.mark.parametrize("failure", ["412", "409", "ParamValidationError"])
def test_exclusive_put_on_other_s3_answers(failure):
    """What other S3 servers and older s3fs/botocore answer to a conditional PUT: a bare 412 or AWS's
    409 for two creates in flight means the key is taken (False: the caller reads back the winner);
    a client that cannot send the condition writes unconditionally."""
    from fsspec.implementations.memory import MemoryFileSystem

    from draftdata.store.fs import put_atomic

    class ServiceError(OSError):
        def __init__(self, code):
            super().__init__(f"An error occurred ({code})")
            self.response = {"Error": {"Code": code}}

    class ParamValidationError(ValueError):
        pass

    class Store(MemoryFileSystem):
        protocol = ("s3like",)

        def pipe_file(self, path, value, mode="overwrite", **kwargs):
            if mode == "create":
                if failure == "ParamValidationError":
                    raise ParamValidationError('Parameter validation failed: Unknown parameter in input: "mode"')
                raise OSError("conditional PUT refused") from ServiceError(
                    "PreconditionFailed" if failure == "412" else "ConditionalRequestConflict")
            return super().pipe_file(path, value)

    fs = Store()
    written = put_atomic(fs, "/b/dataset.json", b"x", exclusive=True)
    assert written == (failure == "ParamValidationError")
    assert fs.exists("/b/dataset.json") == written


def test_exclusive_put_falls_back_where_a_backend_has_no_create_mode():
    """An fsspec backend whose pipe_file predates `mode` still gets dataset.json written (plain
    PUT; the caller's read-back guards the race there)."""
    from fsspec.implementations.memory import MemoryFileSystem

    from draftdata.store.fs import put_atomic

    class OldBackend(MemoryFileSystem):
        protocol = ("oldmem",)

        def pipe_file(self, path, value, **kwargs):
            if "mode" in kwargs:
                raise TypeError("pipe_file() got an unexpected keyword argument 'mode'")
            return super().pipe_file(path, value)

    fs = OldBackend()
    assert put_atomic(fs, "/b/dataset.json", b"first", exclusive=True)
    assert fs.cat_file("/b/dataset.json") == b"first"


@pytest.mark.parametrize("fmt", ["zarr", "arrow"])
def test_verify_checks_record_offsets_metadata_and_gc_keeps_damaged_records(tmp_path, fmt):
    """verify compares the record's offsets with the part's own table, reports a record whose array
    entries lack dtype/shape (no traceback) and a part without its conversation ids; --gc still runs
    with a damaged record, keeps that committed part's data, and never deletes what it cannot date."""
    url = str(tmp_path / "ds")
    write(url, [make_sample(i) for i in range(9)], fmt=fmt, per_part=3)
    ds = open_dataset(url)
    commits = tmp_path / "ds" / "commits"
    first, second, third = (commits / f"{p.id}.json" for p in ds.parts)
    rec = json.loads(first.read_text())
    rec["offsets"][1] += 1                                          # still a valid table, but not the part's
    first.write_text(json.dumps(rec))
    rec = json.loads(second.read_text())
    del rec["arrays"]["input_ids"]["dtype"]
    second.write_text(json.dumps(rec))
    problems = verify_dataset(open_dataset(url))
    assert any(ds.parts[0].id in x and "differ from the commit record's offsets" in x for x in problems), problems
    assert any(ds.parts[1].id in x and "lacks a dtype or shape" in x for x in problems), problems
    if fmt == "zarr":                                               # ids live in the group's attributes
        meta_path = tmp_path / "ds" / "parts" / ds.parts[2].id / "zarr.json"
        meta = json.loads(meta_path.read_text())
        del meta["attributes"]["conversation_ids"]
        meta_path.write_text(json.dumps(meta))
        assert any("lacks its conversation ids" in x for x in verify_dataset(open_dataset(url)))

    third.write_text(third.read_text()[:20])                        # a torn, unparseable record
    (tmp_path / "ds" / "parts" / "0000000000001-undatable").mkdir()  # empty: dated by the directory itself
    out = subprocess.run([sys.executable, "-m", "draftdata.cli", "verify", url, "--gc", "--grace", "0"],
                         capture_output=True, text=True)
    assert out.returncode == 1, out.stdout + out.stderr              # the damaged records are reported ...
    assert "is malformed" in out.stdout + out.stderr and "removed 1 leftover(s)" in out.stderr
    assert (tmp_path / "ds" / "parts" / ds.parts[2].id).is_dir()   # ... and the damaged record's part kept
    assert not (tmp_path / "ds" / "parts" / "0000000000001-undatable").exists()


def test_writing_to_a_missing_bucket_never_creates_it(s3_bucket):
    """s3fs creates a bucket for a "directory" under a missing one: a typo in the URL would quietly
    make a new bucket. The writer creates no directories on object stores and says what is wrong."""
    import uuid

    import fsspec

    _, opts = s3_bucket
    missing = f"s3://nobkt-{uuid.uuid4().hex[:10]}"
    with pytest.raises(StorageAccessError, match="the bucket does not exist .*create it first"):
        create_dataset(f"{missing}/ds", schema(), storage_options=opts)
    fs = fsspec.filesystem("s3", **opts)
    fs.invalidate_cache()
    assert missing[len("s3://"):] not in [b.rstrip("/") for b in fs.ls("")]
    # readers (inspect, verify, train) said "no dataset here" of a missing bucket
    with pytest.raises(StorageAccessError, match=f"the bucket {missing[len('s3://'):]} does not exist"):
        open_dataset(f"{missing}/ds", storage_options=opts)
    with pytest.raises(DatasetNotFoundError, match="no dataset here"):       # the bucket is there
        open_dataset(f"{s3_bucket[0]}/nothing", storage_options=opts)
    write(f"{s3_bucket[0]}/ds", [make_sample(0)], opts=opts)                 # and a file is named as one
    with pytest.raises(DraftdataError, match="is a file, not a dataset directory"):
        open_dataset(f"{s3_bucket[0]}/ds/dataset.json", storage_options=opts)


def test_aborting_a_part_during_an_s3_outage_does_not_raise():
    """A collect whose store went down printed a 140-line thread traceback before its one-line
    error: the writer thread's abort of the part being filled raised botocore's connection error
    (no OSError). Abort is best effort; `verify --gc` removes what is left."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                 region_name="us-east-1").create_bucket(Bucket="down")
    opts = {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"},
            "config_kwargs": {"retries": {"max_attempts": 1}}}
    part = create_dataset("s3://down/ds", schema(), storage_options=opts).open_part()
    part.add(make_sample(1))
    server.stop()
    part.abort()


def test_verify_counts_every_problem_it_does_not_list(tmp_path, capsys):
    """130 ids stored twice: 100 lines are printed and one stands for the other 30; the count covers all."""
    from draftdata.cli import main

    url = str(tmp_path / "ds")
    samples = [make_sample(i, length=5) for i in range(130)]
    write(url, samples + samples, per_part=130)
    assert len(verify_dataset(open_dataset(url))) == 130
    assert main(["verify", url]) == 1
    captured = capsys.readouterr()
    assert captured.out.count("stored 2 times") == 100 and "... and 30 more problem(s)" in captured.out
    assert "130 problem(s) in" in captured.err
