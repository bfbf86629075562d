"""Objects of a store on S3, GCS or Azure: located, listed, fetched whole and uploaded, through
obstore (the Rust ``object_store`` crate, also the engine of zarr 3's ``ObjectStore``).

A :class:`Location` is what travels: a URL and the user's options, no client; each process
builds its client on first use. Credentials and endpoint come from the standard environment
variables (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_DEFAULT_REGION``, ``GOOGLE_APPLICATION_CREDENTIALS``, ...), read by obstore itself, and
from ``storage_options``: obstore's own keys, or the s3fs/fsspec names that xarray and zarr users
pass (``key``, ``secret``, ``token``, ``endpoint_url``, ``anon``, ``client_kwargs``).

Every network failure ends, after obstore's retries and ours, in a
:class:`~shardfit.RemoteStoreError` naming the object.

Why obstore rather than s3fs (fsspec), measured against a moto server on loopback (16 objects
of 48 MiB, 200 of 1 KiB, medians of 4 runs): whole-object downloads streamed to a file 638 MB/s
one at a time and 1,024 MB/s four at a time, against s3fs ``get_file``'s 661 and 720, with
less CPU; 1 KiB GETs 2.2 ms at the median against 7.4 ms, at a tenth of the CPU; uploads four at
a time in one request each 248 MB/s against 187; a server killed mid-download is an error
after ~2 s against ~10 s. It releases the GIL while it waits, where s3fs runs an asyncio loop in
a thread of this process. Its limit: its runtime does not survive ``fork`` (see
``shardfit.read._workers.worker_context``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from shardfit.errors import InvalidOptionError, RemoteStoreError

__all__ = ["REMOTE_SCHEMES", "Location", "is_remote"]

log = logging.getLogger("shardfit")

#: URL schemes read through obstore.
REMOTE_SCHEMES: tuple[str, ...] = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "azure")
#: Whole-object attempts before an error: obstore retries each request itself (5xx, dropped
#: connections); these cover a body cut short mid-stream, which it does not retry.
ATTEMPTS = 4
_FIRST_WAIT_S = 0.5
#: Bytes per piece of a download written to its file (bounds a download's memory): 8 MiB pieces
#: cost about 3 times the CPU of 1 MiB ones (measured, 48 MiB objects).
_PIECE = 1 << 20
#: Files up to this size are uploaded in one request: in parts, moto took twice the server CPU
#: and obstore's upload ran at half the speed (129 against 248 MB/s, four at a time).
_ONE_PUT_BYTES = 512 << 20

# s3fs/fsspec option names (as xarray and zarr users pass them) -> obstore's
_FSSPEC_KEYS = {
    "key": "access_key_id",
    "secret": "secret_access_key",
    "token": "session_token",
    "endpoint_url": "endpoint",
    "region_name": "region",
}


def is_remote(path: object) -> bool:
    """Whether ``path`` is an object store URL this shardfit reads (``s3://``, ``gs://``...)."""
    if not isinstance(path, str) or "://" not in path:
        return False
    return urlsplit(path).scheme.lower() in REMOTE_SCHEMES


def _obstore_options(
    url: str, options: Mapping[str, Any]
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """``(config, client_options, retry_config)`` for obstore from user options in either
    vocabulary."""
    config: dict[str, Any] = {}
    client: dict[str, Any] = {}
    retry: dict[str, Any] = {"max_retries": 3, "retry_timeout": _timedelta(20)}
    for name, value in options.items():
        if name == "retry_config" and isinstance(value, Mapping):
            retry.update(value)
        elif name == "client_kwargs" and isinstance(value, Mapping):
            for k, v in value.items():
                config[_FSSPEC_KEYS.get(str(k), str(k))] = v
        elif name == "anon":
            if value:
                config["skip_signature"] = True
        elif name == "client_options" and isinstance(value, Mapping):
            client.update(value)
        elif name == "allow_http":
            client["allow_http"] = bool(value)
        else:
            config[_FSSPEC_KEYS.get(name, name)] = value
    endpoint = str(config.get("endpoint") or os.environ.get("AWS_ENDPOINT_URL") or "")
    if endpoint.startswith("http://"):
        client.setdefault("allow_http", True)  # a plain-HTTP endpoint: a local or test server
    # obstore's default bounds a whole request, body included, to 30 s: a shard of 128 MiB
    # needs more on a link under 35 Mbit/s
    client.setdefault("timeout", "600s")
    client.setdefault("connect_timeout", "10s")
    if urlsplit(url).scheme.lower() in ("s3", "s3a"):
        # obstore reads AWS_DEFAULT_REGION only as AWS_REGION's fallback where the SDK does;
        # say it here so that both spellings work as with boto3
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if region:
            config.setdefault("region", region)
    return config, client, retry


_CLIENTS: dict[tuple[int, str, str], Any] = {}
_CLIENTS_LOCK = threading.Lock()
#: pid of a process that made an obstore client, if it then forked this one: obstore's
#: runtime threads are not copied by fork, so a client here would hang on its first request
_FORKED_FROM: list[int] = []


def _note_fork() -> None:
    if _CLIENTS and not _FORKED_FROM:
        _FORKED_FROM.append(next(iter(_CLIENTS))[0])


os.register_at_fork(after_in_child=_note_fork)


@dataclass(frozen=True)
class Location:
    """Where a store lives in an object store: ``url`` (``s3://bucket/path/data.zarr``) and the
    ``storage_options`` given for it. Pickles to those two; the client is made per process."""

    url: str
    storage_options: tuple[tuple[str, Any], ...] = field(default=())

    @classmethod
    def of(cls, url: str, storage_options: Mapping[str, Any] | None = None) -> Location:
        """The location of ``url``, checked: a scheme shardfit reads and a bucket."""
        if not is_remote(url):
            raise InvalidOptionError(
                f"url must be an object store URL ({', '.join(s + '://' for s in REMOTE_SCHEMES)})"
                f". Received: {url!r}"
            )
        if not urlsplit(url).netloc:
            raise InvalidOptionError(f"url must name a bucket. Received: {url!r}")
        if storage_options is not None and not isinstance(storage_options, Mapping):
            raise InvalidOptionError(
                f"storage_options must be a mapping of option names to values. Received: "
                f"{storage_options!r}"
            )
        opts = tuple(sorted((storage_options or {}).items()))
        return cls(url.rstrip("/"), opts)

    def client(self) -> Any:
        """This process's obstore store for the location (made once per process)."""
        # the environment is part of the key: a client reads its endpoint and credentials
        # from it when made
        env = repr(sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_")))
        key = (os.getpid(), self.url, repr(self.storage_options) + env)
        got = _CLIENTS.get(key)
        if got is not None:
            return got
        if _FORKED_FROM:
            raise RemoteStoreError(
                f"cannot read {self.url} in a process forked from one that had read an object "
                f"store (pid {_FORKED_FROM[0]}): its client does not survive a fork; start "
                "worker processes with the 'spawn' or 'forkserver' method"
            )
        from obstore.store import from_url

        config, client_options, retry = _obstore_options(self.url, dict(self.storage_options))
        try:
            made = from_url(  # type: ignore[call-overload]
                self.url,
                config=config or None,
                client_options=client_options or None,
                retry_config=retry,
            )
        except Exception as err:  # obstore's configuration errors: unknown key, bad value
            raise InvalidOptionError(
                f"storage_options for {self.url} are not usable: {err}"
            ) from None
        with _CLIENTS_LOCK:
            return _CLIENTS.setdefault(key, made)

    def name(self, rel: str) -> str:
        """The URL of object ``rel`` (a path relative to the store, ``/``-separated)."""
        return f"{self.url}/{rel}"

    # -- reads ---------------------------------------------------------------------------------

    def get_bytes(self, rel: str) -> bytes:
        """Object ``rel`` whole.

        Raises:
            RemoteStoreError: it does not exist, or could not be read after retries (named).
        """
        import obstore

        def fetch() -> bytes:
            return bytes(obstore.get(self.client(), rel).bytes())

        data: bytes = self._retrying(rel, fetch)
        return data

    def exists(self, rel: str) -> bool:
        """Whether object ``rel`` exists."""
        import obstore

        try:
            self._retrying(rel, lambda: obstore.head(self.client(), rel))
        except _Missing:
            return False
        return True

    def get_to_file(self, rel: str, fd: int) -> int:
        """Object ``rel`` streamed into the file open as ``fd`` from its start (the caller
        trims the file to the size returned). Each attempt starts over at byte 0, so a body cut
        short mid-stream is fetched again whole.

        Raises:
            RemoteStoreError: as :meth:`get_bytes`, or the body was shorter than the object.
        """
        import obstore

        def fetch() -> int:
            got = obstore.get(self.client(), rel)
            size = int(got.meta["size"])
            done = 0
            for piece in got.stream(min_chunk_size=_PIECE):
                view = memoryview(piece)
                while view:
                    n = os.pwrite(fd, view, done)
                    done += n
                    view = view[n:]
            if done != size:
                raise _ShortBody(f"{done} of {size} bytes arrived")
            return done

        size: int = self._retrying(rel, fetch)
        return size

    def list(self, prefix: str) -> Iterator[tuple[str, int]]:
        """``(path relative to the store, size)`` of every object under ``prefix``."""
        import obstore

        base = urlsplit(self.url).path.strip("/")

        def pages() -> list[Any]:
            under = prefix.strip("/")
            return list(obstore.list(self.client(), under + "/" if under else None))

        for page in self._retrying(prefix, pages):
            for meta in page:
                path = str(meta["path"])
                if base and path.startswith(base + "/"):
                    path = path[len(base) + 1 :]
                yield path, int(meta["size"])

    # -- writes --------------------------------------------------------------------------------

    def put_file(self, rel: str, local: str) -> None:
        """Upload the file ``local`` as object ``rel`` (multipart for large files, by obstore)."""
        import obstore

        def send() -> None:
            whole = os.path.getsize(local) <= _ONE_PUT_BYTES
            with open(local, "rb") as f:
                obstore.put(self.client(), rel, f, use_multipart=not whole)

        self._retrying(rel, send)

    def put_bytes(self, rel: str, data: bytes) -> None:
        """Write ``data`` as object ``rel``."""
        import obstore

        self._retrying(rel, lambda: obstore.put(self.client(), rel, data))

    def delete(self, rel: str) -> None:
        """Remove object ``rel`` (nothing if it does not exist)."""
        import obstore

        with contextlib.suppress(_Missing):
            self._retrying(rel, lambda: obstore.delete(self.client(), rel))

    # -- errors --------------------------------------------------------------------------------

    def _retrying(self, rel: str, call: Any) -> Any:
        """``call()``, tried up to :data:`ATTEMPTS` times on network errors (waiting 0.5, 1,
        2 s between); a missing object raises :class:`_Missing` at once."""
        wait = _FIRST_WAIT_S
        for attempt in range(1, ATTEMPTS + 1):
            try:
                return call()
            except FileNotFoundError:
                raise _Missing(f"{self.name(rel)} does not exist") from None
            except PermissionError as err:
                raise RemoteStoreError(
                    f"{self.name(rel)}: access denied ({_first_line(err)}): check the "
                    "credentials (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY or storage_options)"
                ) from None
            except InvalidOptionError:
                raise
            except Exception as err:  # obstore's generic and network errors, short bodies
                if attempt == ATTEMPTS:
                    raise RemoteStoreError(
                        f"{self.name(rel)} could not be read or written after {ATTEMPTS} "
                        f"attempts ({_first_line(err)}): check that the object store at "
                        f"{self.endpoint()} is reachable, then run again"
                    ) from None
                log.warning(
                    "%s: %s; trying again in %.1f s", self.name(rel), _first_line(err), wait
                )
                time.sleep(wait)
                wait *= 2
        raise AssertionError("unreachable")

    def endpoint(self) -> str:
        """The endpoint these requests go to, for messages."""
        opts = dict(self.storage_options)
        kwargs = opts.get("client_kwargs")
        return str(
            opts.get("endpoint_url")
            or opts.get("endpoint")
            or (kwargs.get("endpoint_url") if isinstance(kwargs, Mapping) else None)
            or os.environ.get("AWS_ENDPOINT_URL")
            or urlsplit(self.url).scheme + "://" + urlsplit(self.url).netloc
        )


class _Missing(RemoteStoreError, FileNotFoundError):
    """The object does not exist."""


class _ShortBody(Exception):
    """A download ended before the object's last byte."""


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".strip()


def _timedelta(seconds: float) -> Any:
    from datetime import timedelta

    return timedelta(seconds=seconds)
