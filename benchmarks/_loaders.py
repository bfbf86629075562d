"""The loaders the comparison benchmark runs, each as a factory of one-epoch batch iterators.

Every variant serves the same samples (the train split of the same packed store, or the
source JPEGs it was packed from) as (images float32 in [0, 1], labels) batches of
``ctx.batch``. A factory gets a :class:`Ctx` and returns ``epoch(e) -> iterator``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from _peers import PEERS as PEER_LIBRARIES
from _peers import source_files

Batch = tuple[Any, Any]
EpochFn = Callable[[int], Iterator[Batch]]


@dataclass(frozen=True)
class Ctx:
    """Where the data is: ``stores`` by dtype/codec name, ``src`` the JPEG folder."""

    stores: dict[str, Path]
    src: Path
    batch: int
    size: int
    #: images per epoch for the slow, decode-bound baselines (None: all); see run.py
    cap: int | None = None


def _reader(ctx: Ctx, name: str = "float32"):  # type: ignore[no-untyped-def]
    import shardfit

    return shardfit.open_split(ctx.stores[name], "train")


def _plan(ctx: Ctx, epoch: int) -> list[np.ndarray]:
    """Batches of epoch ``epoch`` as shardfit.Sequence(seed=0) cuts them (without Keras)."""
    from shardfit import epoch_order

    r = _reader(ctx)
    order = epoch_order(r.count, r.shard_size, seed=0, epoch=epoch, shuffle=True, window=4)
    return [order[s : s + ctx.batch] for s in range(0, r.count, ctx.batch)]


def shard_files(store: Path) -> list[Path]:
    """Every shard file of the train split, in shard order."""
    import shardfit

    return [Path(f) for f in shardfit.open_split(store, "train").shard_files()]


# -- ceilings ---------------------------------------------------------------------------------


def ceiling_ram(ctx: Ctx) -> EpochFn:
    """Copy from an in-RAM array into one reused buffer: the memory bus alone."""
    r = _reader(ctx)
    data = np.empty((r.count, *r.image_shape), np.float32)
    r.read_into(np.arange(r.count), data)
    labels = r.labels()
    buf = np.empty((ctx.batch, *r.image_shape), np.float32)

    def epoch(e: int) -> Iterator[Batch]:
        for idx in _plan(ctx, e):
            out = buf[: idx.size]
            np.take(data, idx, axis=0, out=out)
            yield out, labels[idx]

    return epoch


def stride(r: Any) -> int:
    """Bytes from one float32 sample to the next in a shard file: the image, then (format 3
    on) its 4-byte checksum."""
    return int(np.prod(r.image_shape)) * 4 + (4 if r.checksummed else 0)


def images_in(r: Any, buf: Any, n: int, offset: int = 0) -> np.ndarray:
    """The ``n`` float32 images laid out from ``offset`` of ``buf`` as a shard file holds them
    (each followed by its checksum): a strided view, nothing copied."""
    h, w, c = r.image_shape
    return np.ndarray(
        (n, h, w, c),
        np.float32,
        buffer=buf,
        offset=offset,
        strides=(stride(r), w * c * 4, c * 4, 4),
    )


def memmap_images(r: Any, k: int) -> np.ndarray:
    """Shard ``k``'s images as an ``np.memmap``-backed array ``(n, H, W, 3)``: sample ``j`` at
    its offset in the file (from the shard's index; each ends with its 4-byte checksum)."""
    offsets = r.sample_offsets(k)
    return images_in(r, np.memmap(r.shard_files()[k], np.uint8, "r"), offsets.size, int(offsets[0]))


def ceiling_memmap(ctx: Ctx) -> EpochFn:
    """np.memmap of every shard file, each sample copied into one reused buffer."""
    r = _reader(ctx)
    maps = [memmap_images(r, k) for k in range(r.num_shards)]
    labels = r.labels()
    buf = np.empty((ctx.batch, *r.image_shape), np.float32)

    def epoch(e: int) -> Iterator[Batch]:
        for idx in _plan(ctx, e):
            for b, i in enumerate(idx.tolist()):
                k, j = divmod(i, r.shard_size)
                buf[b] = maps[k][j]
            yield buf[: idx.size], labels[idx]

    return epoch


def ceiling_preadv(ctx: Ctx) -> EpochFn:
    """Large os.preadv reads of whole shard files into one reused buffer: the disk's pace.

    Reads shards in the epoch's shard order; batches are cut from the shard just read."""
    r = _reader(ctx)
    labels = r.labels()
    per = stride(r)
    buf = np.empty(r.shard_size * per, np.uint8)
    files = shard_files(ctx.stores["float32"])

    def epoch(e: int) -> Iterator[Batch]:
        order = np.random.default_rng([0, e]).permutation(len(files))
        for k in order.tolist():
            n = min(r.shard_size, r.count - k * r.shard_size)
            fd = os.open(files[k], os.O_RDONLY)
            try:
                got = 0
                while got < n * per:
                    got += os.preadv(
                        fd, [memoryview(buf)[got : min(n * per, got + (8 << 20))]], got
                    )
            finally:
                os.close(fd)
            images = images_in(r, buf, n)
            for s in range(0, n, ctx.batch):
                yield (
                    images[s : s + ctx.batch],
                    labels[k * r.shard_size + s : k * r.shard_size + s + ctx.batch],
                )

    return epoch


#: Threads of the parallel-read ceiling, and the size of each of their reads.
PARALLEL_THREADS = 8
PARALLEL_CHUNK = 8 << 20


def ceiling_parallel(ctx: Ctx) -> EpochFn:
    """The disk's own limit: many large reads in flight. ``PARALLEL_THREADS`` threads each read
    a whole shard file (in the epoch's shard order) with 8 MiB ``preadv`` calls into a buffer of
    their own (reused: mapping fresh memory per shard costs more CPU than the reads), then tell
    the kernel to drop the file's pages (the bytes are in the buffer; a page cache left to fill
    under a memory limit is reclaimed at a cost: measured 2,495-2,900 img/s without the drop,
    3,116-3,420 with it, docs/design.md "Reading whole shards ahead"); batches are cut from each
    shard as it arrives, in order. No shuffling within a shard: the most favourable access
    pattern for the disk."""
    import queue

    r = _reader(ctx)
    labels = r.labels()
    per = stride(r)
    files = shard_files(ctx.stores["float32"])
    # one buffer per thread, plus the one being cut into batches and one waiting
    free: queue.SimpleQueue[np.ndarray] = queue.SimpleQueue()
    for _ in range(PARALLEL_THREADS + 2):
        free.put(np.empty(r.shard_size * per, np.uint8))

    def read(k: int) -> np.ndarray:
        buf = free.get()
        n = min(r.shard_size, r.count - k * r.shard_size) * per
        fd = os.open(files[k], os.O_RDONLY)
        try:
            got = 0
            while got < n:
                done = os.preadv(fd, [memoryview(buf)[got : min(n, got + PARALLEL_CHUNK)]], got)
                if done == 0:
                    raise OSError(f"{files[k]} ended early")
                got += done
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        return buf

    def epoch(e: int) -> Iterator[Batch]:
        from concurrent.futures import ThreadPoolExecutor

        order = np.random.default_rng([0, e]).permutation(len(files)).tolist()
        with ThreadPoolExecutor(PARALLEL_THREADS) as pool:
            pending = [pool.submit(read, k) for k in order[:PARALLEL_THREADS]]
            for i, k in enumerate(order):
                buf = pending[i].result()
                if len(pending) < len(order):
                    pending.append(pool.submit(read, order[len(pending)]))
                n = min(r.shard_size, r.count - k * r.shard_size)
                images = images_in(r, buf, n)
                for s in range(0, n, ctx.batch):
                    yield (
                        images[s : s + ctx.batch],
                        labels[k * r.shard_size + s : k * r.shard_size + s + ctx.batch],
                    )
                free.put(buf)

    return epoch


def ceiling_streams(ctx: Ctx) -> EpochFn:
    """The other read pattern that gets the most from the disk: shardfit's own read-ahead of
    whole shards (``ShardStager``, ``io="stream"``) along the epoch plan, with nothing copied
    out: each batch is one of its samples repeated (a view), so this is the reading alone. The
    regime's read ceiling is the faster of this and ``ceiling: parallel reads``."""
    from shardfit.read._epoch import batch_count, epoch_order
    from shardfit.read._stage import ShardStager

    r = _reader(ctx)
    labels = r.labels()
    stager = ShardStager(
        r, seed=0, shuffle=True, window=4, batch_size=ctx.batch, drop_remainder=False
    )

    def epoch(e: int) -> Iterator[Batch]:
        order = epoch_order(r.count, r.shard_size, seed=0, epoch=e, shuffle=True, window=4)
        for b in range(batch_count(r.count, ctx.batch, False)):
            samples = order[b * ctx.batch : (b + 1) * ctx.batch]
            stager.advance(e, b)
            with stager.hold(e, samples) as get:
                k, j = divmod(int(samples[0]), r.shard_size)
                dense = get(k)[2]
                if dense is None:
                    raise RuntimeError("ceiling: shard streams needs the packer's dense layout")
                view = np.broadcast_to(dense[j], (samples.size, *r.image_shape))
            yield view, labels[samples]

    return epoch


# -- shardfit ---------------------------------------------------------------------------------


def _shardfit(name: str, **kwargs: Any) -> Callable[[Ctx], EpochFn]:
    def factory(ctx: Ctx) -> EpochFn:
        from shardfit import Sequence

        seq = Sequence(ctx.stores[name], batch_size=ctx.batch, seed=0, **kwargs)

        def epoch(e: int) -> Iterator[Batch]:
            # called for epochs 0, 1, ... in turn; the epoch hooks, as a training loop calls
            # them, let the Sequence stream its plan (and read ahead along it)
            seq.on_epoch_begin()
            for i in range(len(seq)):
                yield seq[i]
            seq.on_epoch_end()

        return epoch

    return factory


def _keras_adapter(seq: Any) -> EpochFn:
    """Batches the way ``fit`` pulls them: Keras's PyDataset adapter, its workers included."""
    from keras.src.trainers.data_adapters.py_dataset_adapter import PyDatasetAdapter

    adapter = PyDatasetAdapter(seq, shuffle=False)

    def epoch(e: int) -> Iterator[Batch]:
        adapter.on_epoch_begin()
        yield from adapter.get_numpy_iterator()
        adapter.on_epoch_end()

    return epoch


def shardfit_workers(use_multiprocessing: bool) -> Callable[[Ctx], EpochFn]:
    def factory(ctx: Ctx) -> EpochFn:
        from shardfit import Sequence

        seq = Sequence(
            ctx.stores["float32"],
            batch_size=ctx.batch,
            seed=0,
            workers=2,
            use_multiprocessing=use_multiprocessing,
            max_queue_size=10,
        )
        return _keras_adapter(seq)

    return factory


# -- what people use today --------------------------------------------------------------------


def zarr_naive(ctx: Ctx) -> EpochFn:
    """A PyDataset that indexes the zarr array with zarr-python for every batch."""
    import zarr

    root = zarr.open_group(str(ctx.stores["float32"]), mode="r")
    images, labels = root["train/images"], root["train/labels"][:]

    def epoch(e: int) -> Iterator[Batch]:
        batches = _plan(ctx, e)
        for idx in batches[: None if ctx.cap is None else -(-ctx.cap // ctx.batch)]:
            yield images.get_orthogonal_selection((np.sort(idx),)), labels[np.sort(idx)]

    return epoch


def pil_sequence(ctx: Ctx) -> EpochFn:
    """The ``fit_generator`` articles' Sequence: open, convert, resize every JPEG every batch."""
    from PIL import Image

    files = source_files(ctx.src)

    def epoch(e: int) -> Iterator[Batch]:
        order = np.random.default_rng([0, e]).permutation(len(files))[: ctx.cap]
        for s in range(0, len(order), ctx.batch):
            chunk = [files[i] for i in order[s : s + ctx.batch]]
            x = np.stack(
                [
                    np.asarray(
                        Image.open(f).convert("RGB").resize((ctx.size, ctx.size)), np.float32
                    )
                    / 255
                    for f, _ in chunk
                ]
            )
            yield x, np.array([c for _, c in chunk], np.int32)

    return epoch


def image_dataset_from_directory(ctx: Ctx) -> EpochFn:
    ds = fit_idfd(ctx)

    def epoch(e: int) -> Iterator[Batch]:
        for x, y in ds:
            yield x.numpy(), y.numpy()

    return epoch


def in_memory(ctx: Ctx) -> EpochFn:
    """Everything loaded into numpy arrays first; fancy-indexed batches (what fit(x, y) does)."""
    r = _reader(ctx)
    data = np.empty((r.count, *r.image_shape), np.float32)
    r.read_into(np.arange(r.count), data)
    labels = r.labels()

    def epoch(e: int) -> Iterator[Batch]:
        for idx in _plan(ctx, e):
            yield data[idx], labels[idx]

    return epoch


def tfdata_dataset(ctx: Ctx, e: int) -> Any:
    """A hand-written tf.data pipeline over the same shard bytes: interleave the shard files as
    fixed-length records, parallel map, shuffle, batch, prefetch."""
    import tensorflow as tf

    r = _reader(ctx)
    files = [str(f) for f in shard_files(ctx.stores["float32"])]
    labels = r.labels()
    per = stride(r)  # each record: an image, then its checksum
    pixels = int(np.prod(r.image_shape))
    footer = 16 * r.shard_size + 4
    starts = np.array([k * r.shard_size for k in range(len(files))], np.int64)

    def records(k: Any) -> Any:
        images = tf.data.FixedLengthRecordDataset(tf.gather(files, k), per, footer_bytes=footer)
        ids = tf.data.Dataset.range(tf.gather(starts, k), tf.gather(starts, k) + r.shard_size)
        return tf.data.Dataset.zip((images, ids))

    def decode(raw: Any, i: Any) -> Any:
        x = tf.reshape(tf.io.decode_raw(raw, tf.float32)[:pixels], r.image_shape)
        return x, tf.gather(labels, i)

    return (
        tf.data.Dataset.from_tensor_slices(np.random.default_rng([0, e]).permutation(len(files)))
        .interleave(records, cycle_length=4, num_parallel_calls=tf.data.AUTOTUNE)
        .map(decode, num_parallel_calls=tf.data.AUTOTUNE)
        .shuffle(4 * ctx.batch, seed=e)
        .batch(ctx.batch)
        .prefetch(tf.data.AUTOTUNE)
    )


def tfdata_shards(ctx: Ctx) -> EpochFn:
    def epoch(e: int) -> Iterator[Batch]:
        for x, y in tfdata_dataset(ctx, e):
            yield x.numpy(), y.numpy()

    return epoch


def _peer(name: str) -> Callable[[Ctx], EpochFn]:
    def factory(ctx: Ctx) -> EpochFn:
        import _peers

        return _peers.epochs(name, ctx.stores[name], ctx.batch, ctx.size)

    return factory


def _fit_peer(name: str) -> Callable[[Ctx], Any]:
    def factory(ctx: Ctx) -> Any:
        import _peers

        return _peers.loader(name, ctx.stores[name], ctx.batch, ctx.size)

    return factory


#: the dedicated streaming loaders (benchmarks/_peers.py), each over its own copy of the data
PEERS = tuple(PEER_LIBRARIES)

VARIANTS: dict[str, Callable[[Ctx], EpochFn]] = {
    "ceiling: RAM copy": ceiling_ram,
    "ceiling: memmap copy": ceiling_memmap,
    "ceiling: preadv": ceiling_preadv,
    "ceiling: parallel reads": ceiling_parallel,
    "ceiling: shard streams": ceiling_streams,
    "shardfit float32": _shardfit("float32"),
    # what verifying reads costs: the same row without it (verify="once", the default, checks
    # each sample's crc32c the first time this process reads it, and on every read that the
    # chunk is the one packed there)
    "shardfit float32, verify off": _shardfit("float32", verify="off"),
    "shardfit uint8": _shardfit("uint8"),
    "shardfit zstd": _shardfit("zstd"),
    "shardfit 2 threads": shardfit_workers(False),
    "shardfit 2 processes": shardfit_workers(True),
    "zarr-python PyDataset": zarr_naive,
    "PIL Sequence": pil_sequence,
    "image_dataset_from_directory": image_dataset_from_directory,
    "in-memory numpy": in_memory,
    "tf.data over shards": tfdata_shards,
    **{name: _peer(name) for name in PEERS},
}


# -- end to end: the same loaders feeding model.fit -------------------------------------------


def _pydataset(length: int, get: Callable[[int], Batch], **kwargs: Any) -> Any:
    import keras

    class Wrapped(keras.utils.PyDataset):  # type: ignore[misc]
        def __len__(self) -> int:
            return length

        def __getitem__(self, i: int) -> Batch:
            return get(i)

    return Wrapped(**kwargs)


def fit_constant(ctx: Ctx) -> Any:
    """The framework's own ceiling: one in-memory batch served again and again."""
    r = _reader(ctx)
    x = np.empty((ctx.batch, *r.image_shape), np.float32)
    r.read_into(np.arange(ctx.batch), x)
    y = r.labels()[: ctx.batch]
    return _pydataset(-(-r.count // ctx.batch), lambda i: (x, y))


def fit_shardfit(**kwargs: Any) -> Callable[[Ctx], Any]:
    def factory(ctx: Ctx) -> Any:
        from shardfit import Sequence

        return Sequence(ctx.stores["float32"], batch_size=ctx.batch, seed=0, **kwargs)

    return factory


def fit_in_memory(ctx: Ctx) -> Any:
    r = _reader(ctx)
    data = np.empty((r.count, *r.image_shape), np.float32)
    r.read_into(np.arange(r.count), data)
    return data, r.labels()


def fit_pil(ctx: Ctx) -> Any:
    from PIL import Image

    files = source_files(ctx.src)

    def get(i: int) -> Batch:
        chunk = files[i * ctx.batch : (i + 1) * ctx.batch]
        x = np.stack(
            [
                np.asarray(Image.open(f).convert("RGB").resize((ctx.size, ctx.size)), np.float32)
                / 255
                for f, _ in chunk
            ]
        )
        return x, np.array([c for _, c in chunk], np.int32)

    n = len(files) if ctx.cap is None else min(ctx.cap, len(files))
    return _pydataset(-(-n // ctx.batch), get)


def fit_zarr(ctx: Ctx) -> Any:
    import zarr

    root = zarr.open_group(str(ctx.stores["float32"]), mode="r")
    images, labels = root["train/images"], root["train/labels"][:]
    n = images.shape[0]
    order = np.random.default_rng(0).permutation(n)

    def get(i: int) -> Batch:
        idx = np.sort(order[i * ctx.batch : (i + 1) * ctx.batch])
        return images.get_orthogonal_selection((idx,)), labels[idx]

    if ctx.cap is not None:
        n = min(n, ctx.cap)
    return _pydataset(-(-n // ctx.batch), get)


def fit_idfd(ctx: Ctx) -> Any:
    """keras.utils.image_dataset_from_directory over the source JPEGs, with prefetch."""
    import keras
    import tensorflow as tf

    ds = keras.utils.image_dataset_from_directory(
        ctx.src,
        image_size=(ctx.size, ctx.size),
        batch_size=ctx.batch,
        shuffle=True,
        seed=0,
        verbose=False,
    ).map(lambda x, y: (x / 255.0, y))
    if ctx.cap is not None:
        ds = ds.take(-(-ctx.cap // ctx.batch))
    return ds.prefetch(tf.data.AUTOTUNE)


def fit_tfdata(ctx: Ctx) -> Any:
    return tfdata_dataset(ctx, 0)


FIT_VARIANTS: dict[str, Callable[[Ctx], Any]] = {
    "fit: constant batch (ceiling)": fit_constant,
    "fit: shardfit": fit_shardfit(),
    "fit: shardfit, verify off": fit_shardfit(verify="off"),
    "fit: shardfit 2 threads": fit_shardfit(workers=2, max_queue_size=10),
    "fit: shardfit 2 processes": fit_shardfit(
        workers=2, use_multiprocessing=True, max_queue_size=10
    ),
    "fit: in-memory numpy": fit_in_memory,
    "fit: PIL Sequence": fit_pil,
    "fit: zarr-python PyDataset": fit_zarr,
    "fit: image_dataset_from_directory": fit_idfd,
    "fit: tf.data over shards": fit_tfdata,
    **{f"fit: {name}": _fit_peer(name) for name in PEERS},
    # the same Sequence under Keras's other backends (run.py sets KERAS_BACKEND for these)
    "fit: shardfit (jax)": fit_shardfit(),
    "fit: shardfit (torch)": fit_shardfit(),
    # each backend's own ceiling for its fit rows
    "fit: constant batch (jax, ceiling)": fit_constant,
    "fit: constant batch (torch, ceiling)": fit_constant,
}
