"""A real S3-compatible server on loopback for tests: moto's server mode in its own process."""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class S3Server:
    """``python -m moto.server`` on ``127.0.0.1:port``; objects live in its memory."""

    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """The standard AWS variables pointing at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(self.endpoint + "/moto-api/", timeout=1).close()
                return
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError("moto server exited at start") from None
                time.sleep(0.05)
        raise RuntimeError("moto server did not answer within 30 s")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def client(self) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        )

    def new_bucket(self) -> str:
        name = f"shardfit-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def objects(self, bucket: str, prefix: str) -> dict[str, bytes]:
        """Every object under ``prefix``, by its path relative to it."""
        c = self.client()
        out = {}
        for page in c.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                body = c.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
                out[item["Key"][len(prefix) :].lstrip("/")] = body
        return out

    def upload_tree(self, local: Path, bucket: str, prefix: str) -> None:
        """Put every file under ``local`` (the objects a restarted server is given back)."""
        c = self.client()
        for dirpath, _, names in os.walk(local):
            for name in names:
                path = Path(dirpath) / name
                key = f"{prefix}/{path.relative_to(local).as_posix()}"
                c.put_object(Bucket=bucket, Key=key, Body=path.read_bytes())


class CuttingProxy:
    """A TCP proxy on loopback in front of ``upstream`` that, once armed, closes the first
    connection whose responses pass ``after`` bytes: a download cut short mid-body."""

    def __init__(self, upstream_port: int, after: int) -> None:
        import threading

        self.after = after
        self.armed = True
        self.cuts = 0
        self._upstream = upstream_port
        self._lock = threading.Lock()
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self.port = int(self._sock.getsockname()[1])
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        import threading

        while True:
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self._upstream))
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, responses: bool) -> None:
        sent = 0
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
                sent += len(data)
                if responses and sent > self.after:
                    with self._lock:
                        cut = self.armed
                        self.armed = False
                    if cut:
                        self.cuts += 1
                        break
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def close(self) -> None:
        self._sock.close()


def cached_shard_bytes(cache: Path) -> int:
    """Bytes of shard files and downloads under ``cache``, counted under the cache's lock (as
    its own accounting is: a walk without it can see a shard deleted in one folder and its
    replacement made in another, and count both)."""
    if not (cache / ".lock").exists():
        return 0
    fd = os.open(cache / ".lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        total = 0
        for dirpath, _, names in os.walk(cache):
            if f"{os.sep}images{os.sep}c{os.sep}" in dirpath + os.sep:
                for n in names:
                    with contextlib.suppress(FileNotFoundError):  # renamed into place
                        total += os.path.getsize(os.path.join(dirpath, n))
        return total
    finally:
        os.close(fd)
