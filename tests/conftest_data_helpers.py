"""Tiny CIFAR-10 stand-ins in the official on-disk layout, and a local HTTP server.

Used by test_data.py and test_fetch.py, so no test needs the real 170 MB archive.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import pickle
import struct
import tarfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

NAMES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
CLASSES = ["airplane", "automobile", "bird", "cat", "deer",
           "dog", "frog", "horse", "ship", "truck"]


def batch_dict(X: np.ndarray, y: np.ndarray, label: str = "tiny") -> dict[bytes, object]:
    """A batch dict as the official files hold it: bytes keys, labels as a list of ints."""
    return {b"batch_label": label.encode(), b"data": X, b"labels": [int(v) for v in y],
            b"filenames": [f"img_{i}.png".encode() for i in range(len(y))]}


def py2_pickle(X: np.ndarray, y: np.ndarray) -> bytes:
    """The bytes Python 2's cPickle wrote for a batch (protocol 2, Python 2 str objects).

    Python 3 cannot produce these (it writes bytes as _codecs.encode calls), so they are
    spelled out opcode by opcode, as in the official files.
    """
    def s(b: bytes) -> bytes:
        return b"U" + bytes([len(b)]) + b if len(b) < 256 else b"T" + struct.pack("<i", len(b)) + b

    def i(n: int) -> bytes:
        return b"K" + bytes([n]) if 0 <= n < 256 else b"J" + struct.pack("<i", n)

    rows, cols = X.shape
    arr = (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n" + i(0) + b"\x85"
           + s(b"b") + b"\x87R(" + i(1) + i(rows) + i(cols) + b"\x86cnumpy\ndtype\n"
           + s(b"u1") + i(0) + i(1) + b"\x87R(" + i(3) + s(b"|") + b"NNN" + i(-1) + i(-1)
           + i(0) + b"tb\x89" + s(np.ascontiguousarray(X, np.uint8).tobytes()) + b"tb")
    labels = b"](" + b"".join(i(int(v)) for v in y) + b"e"
    return (b"\x80\x02}(" + s(b"batch_label") + s(b"tiny") + s(b"labels") + labels
            + s(b"data") + arr + b"u.")


def write_batch(path: Path, X: np.ndarray, y: np.ndarray, protocol: int = 2) -> None:
    """Write one batch file with pickle ``protocol`` (2, like the originals)."""
    path.write_bytes(pickle.dumps(batch_dict(X, y), protocol=protocol))


def make_cifar_folder(folder: Path, rows: int = 8, seed: int = 0) -> tuple[np.ndarray,
                                                                          np.ndarray]:
    """Six batches of ``rows`` random images plus batches.meta; returns all (X, y)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    X = rng.integers(0, 256, size=(6 * rows, 3072), dtype=np.uint8)
    y = rng.integers(0, 10, size=6 * rows)
    for k, name in enumerate(NAMES):
        write_batch(folder / name, X[k * rows : (k + 1) * rows], y[k * rows : (k + 1) * rows])
    meta = {b"label_names": [c.encode() for c in CLASSES], b"num_cases_per_batch": rows}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return X, y.astype(np.int64)


def tar_gz(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    """A .tar.gz holding the given (header, content) members."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def cifar_archive(tmp: Path, rows: int = 8) -> bytes:
    """A tiny cifar-10-python.tar.gz: cifar-10-batches-py/ with six batches and meta."""
    src = tmp / "archive-src" / "cifar-10-batches-py"
    make_cifar_folder(src, rows=rows)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(src, arcname="cifar-10-batches-py")
    return buf.getvalue()


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


class Server:
    """A local HTTP server for one payload; counts requests; can stall or die mid-body."""

    def __init__(self, payload: bytes, die_after: int | None = None, delay: float = 0.0):
        self.payload, self.die_after, self.delay = payload, die_after, delay
        self.requests = 0
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the http.server API
                outer.requests += 1
                self.send_response(200)
                self.send_header("Content-Length", str(len(outer.payload)))
                self.end_headers()
                body = outer.payload
                if outer.die_after is not None:
                    body = body[: outer.die_after]
                half = len(body) // 2
                self.wfile.write(body[:half])
                self.wfile.flush()
                if outer.delay:
                    threading.Event().wait(outer.delay)
                self.wfile.write(body[half:])
                if outer.die_after is not None:
                    self.close_connection = True

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/cifar-10-python.tar.gz"


@contextmanager
def serve(payload: bytes, die_after: int | None = None, delay: float = 0.0) -> Iterator[Server]:
    """Run a ``Server`` on a free port in a thread for the duration of the block."""
    server = Server(payload, die_after, delay)
    thread = threading.Thread(target=server.httpd.serve_forever, args=(0.02,),
                              daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.httpd.shutdown()
        server.httpd.server_close()
        thread.join(timeout=5)
