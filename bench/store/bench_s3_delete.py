"""Removing a part tree on S3 (moto on 127.0.0.1): `remove_tree`'s batched DeleteObjects against
one DELETE per object, N objects each, side by side in one run.

    python bench/store/bench_s3_delete.py [N]
"""

from __future__ import annotations

import os
import sys
import time


def main(n: int) -> None:
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        os.environ.setdefault(key, "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    import s3fs
    from moto.server import ThreadedMotoServer

    from draftdata.store.fs import remove_tree

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": f"http://{host}:{port}"})
        fs.mkdir("bench")
        for tree in ("batched", "single"):
            for i in range(n):
                fs.pipe_file(f"bench/{tree}/chunk{i}", b"x")
        started = time.perf_counter()
        remove_tree(fs, "bench/batched")
        batched = time.perf_counter() - started
        started = time.perf_counter()
        for path in fs.find("bench/single"):
            fs.rm_file(path)
        single = time.perf_counter() - started
        fs.invalidate_cache()
        left = len(fs.find("bench/batched")) + len(fs.find("bench/single"))
        print(f"{n:,} objects: remove_tree {batched:.2f} s, one DELETE per object {single:.2f} s "
              f"({single / batched:.1f}x); objects left {left}")
    finally:
        server.stop()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 1500)
