"""The dedicated streaming loaders beside shardfit in the loader benchmark (``run.py --peers``):
Google Grain (ArrayRecord), MosaicML Streaming (MDS), LitData (``litdata.optimize``) and
WebDataset (tar shards of raw float32 ``.npy``, and of JPEGs).

Each packs the same JPEG folder with its own writer (decoding as a user would: Pillow, RGB,
bilinear resize, float32 / 255; the source decoded by ``WORKERS`` processes, as shardfit's
packer uses here), then serves (images float32 (B, H, W, 3), labels) batches of ``ctx.batch``
the way its documentation shows, with ``WORKERS`` worker processes (the machine's cores):

- Grain: ``MapDataset.source(ArrayRecordDataSource).shuffle(seed).map(parse)``, then
  ``to_iter_dataset().batch(B).mp_prefetch(num_workers)``; Keras takes Grain datasets in
  ``fit`` (and iterates one afresh each epoch: the same seed, so the same order every epoch).
- Streaming: ``StreamingDataset(local=..., shuffle=True, batch_size=B)`` in a torch
  ``DataLoader``; LitData: ``StreamingDataset(dir, shuffle=True)`` in its ``StreamingDataLoader``.
  Both yield dicts; a collate function turns each batch into ``(x, y)`` for Keras.
- WebDataset: ``WebDataset(urls, shardshuffle=...).shuffle(1000).decode().to_tuple().batched(B)``
  in a torch ``DataLoader(batch_size=None)`` (its own ``WebLoader`` 1.0 is no DataLoader, and
  Keras 3.15 refuses it in ``fit``).

Every factory imports its library lazily: a peer that is not installed fails its own rows with
``PeerMissing`` (the report gives the reason), never the others.
"""

from __future__ import annotations

import io
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

#: Worker processes of every peer's loader and packer: the machine's 2 cores.
WORKERS = 2
#: Bytes per shard file or chunk, where the writer asks (shardfit's shards are 128 MiB too).
SHARD_BYTES = 128 << 20
#: WebDataset's sample shuffle buffer (the figure its documentation's examples use).
WDS_SHUFFLE = 1000
#: JPEG quality of the WebDataset JPEG variant (the source folder's own quality).
JPEG_QUALITY = 90

#: peer -> (the module that must import, the pip requirement that brings it)
PEERS: dict[str, tuple[str, str]] = {
    "grain": ("grain", "grain array-record"),
    "streaming": ("streaming", "mosaicml-streaming"),
    "litdata": ("litdata", "litdata"),
    "webdataset": ("webdataset", "webdataset"),
    "webdataset jpeg": ("webdataset", "webdataset"),
}
#: what each peer's loader needs imported (its imports baseline)
IMPORTS: dict[str, tuple[str, ...]] = {
    "grain": ("grain",),
    "streaming": ("torch", "streaming"),
    "litdata": ("torch", "litdata"),
    "webdataset": ("torch", "webdataset"),
    "webdataset jpeg": ("torch", "webdataset"),
}


class PeerMissing(RuntimeError):
    """A peer's library is not installed here."""


def require(peer: str) -> None:
    import importlib.util

    module, pip_name = PEERS[peer]
    if importlib.util.find_spec(module) is None:
        raise PeerMissing(f"{peer}: not installed (pip install {pip_name}, or shardfit[peers])")


# -- packing ----------------------------------------------------------------------------------


def source_files(src: Path) -> list[tuple[str, int]]:
    """(path, label) of every image, classes as subfolders in sorted order (as shardfit and
    image_dataset_from_directory label them)."""
    classes = sorted(p.name for p in src.iterdir() if p.is_dir())
    return [(str(f), c) for c, name in enumerate(classes) for f in sorted((src / name).iterdir())]


def decode(item: tuple[str, int, int]) -> tuple[np.ndarray, int]:
    """One source image as a user of these libraries decodes it: RGB, bilinear, float32/255."""
    from PIL import Image

    path, label, px = item
    with Image.open(path) as im:
        rgb = im.convert("RGB").resize((px, px), Image.Resampling.BILINEAR)
    return np.asarray(rgb, np.float32) / np.float32(255), label


def encode_jpeg(item: tuple[str, int, int]) -> tuple[bytes, int]:
    """One source image resized and encoded again as a JPEG (the WebDataset JPEG variant)."""
    from PIL import Image

    path, label, px = item
    with Image.open(path) as im:
        rgb = im.convert("RGB").resize((px, px), Image.Resampling.BILINEAR)
    out = io.BytesIO()
    rgb.save(out, format="JPEG", quality=JPEG_QUALITY)
    return out.getvalue(), label


def _in_order(src: Path, px: int, fn: Callable[[Any], Any]) -> Iterator[Any]:
    """``fn`` over every source image, ``WORKERS`` processes, results in file order."""
    import multiprocessing as mp

    items = [(f, c, px) for f, c in source_files(src)]
    with mp.get_context("fork").Pool(WORKERS) as pool:
        yield from pool.imap(fn, items, chunksize=8)


def _per_file(px: int) -> int:
    return max(1, SHARD_BYTES // (px * px * 3 * 4))


def pack_grain(src: Path, out: Path, px: int) -> None:
    """ArrayRecord files, one record per sample: int32 label, then the float32 image bytes
    (``group_size:1,uncompressed``: what random access to single records asks for)."""
    from array_record.python.array_record_module import ArrayRecordWriter

    out.mkdir(parents=True)
    per, writer = _per_file(px), None
    for n, (img, label) in enumerate(_in_order(src, px, decode)):
        if n % per == 0:
            if writer is not None:
                writer.close()
            path = out / f"data-{n // per:05d}.array_record"
            writer = ArrayRecordWriter(str(path), "group_size:1,uncompressed")
        writer.write(np.int32(label).tobytes() + img.tobytes())
    if writer is not None:
        writer.close()


def pack_streaming(src: Path, out: Path, px: int) -> None:
    """MDS shards written by Streaming's ``MDSWriter``, uncompressed."""
    from streaming import MDSWriter

    columns = {"x": f"ndarray:float32:{px},{px},3", "y": "int"}
    with MDSWriter(out=str(out), columns=columns, compression=None, size_limit=SHARD_BYTES) as w:
        for img, label in _in_order(src, px, decode):
            w.write({"x": img, "y": label})


def _litdata_item(item: tuple[str, int, int]) -> dict[str, Any]:
    img, label = decode(item)
    return {"x": img, "y": label}


def pack_litdata(src: Path, out: Path, px: int) -> None:
    """LitData chunks written by ``litdata.optimize`` with its own ``WORKERS`` workers."""
    import litdata

    # optimize stages chunks in a cache folder (/tmp/chunks by default): keep it beside ``out``
    os.environ["DATA_OPTIMIZER_CACHE_FOLDER"] = str(out.parent / f".{out.name}-cache")
    litdata.optimize(
        fn=_litdata_item,
        inputs=[(f, c, px) for f, c in source_files(src)],
        output_dir=str(out),
        chunk_bytes=SHARD_BYTES,
        num_workers=WORKERS,
        reorder_files=False,
        verbose=False,
    )


def _pack_wds(src: Path, out: Path, px: int, jpeg: bool) -> None:
    import webdataset as wds

    out.mkdir(parents=True)
    with wds.ShardWriter(str(out / "shard-%06d.tar"), maxsize=SHARD_BYTES, verbose=0) as sink:
        for i, (data, label) in enumerate(_in_order(src, px, encode_jpeg if jpeg else decode)):
            sink.write({"__key__": f"{i:08d}", "jpg" if jpeg else "npy": data, "cls": label})


PACKERS: dict[str, Callable[[Path, Path, int], None]] = {
    "grain": pack_grain,
    "streaming": pack_streaming,
    "litdata": pack_litdata,
    "webdataset": lambda s, o, px: _pack_wds(s, o, px, jpeg=False),
    "webdataset jpeg": lambda s, o, px: _pack_wds(s, o, px, jpeg=True),
}


def disk_bytes(path: Path) -> int:
    """Bytes the files under ``path`` take on disk (allocated blocks, as ``du`` counts)."""
    return sum(p.stat().st_blocks * 512 for p in path.rglob("*") if p.is_file())


def pack(peer: str, src: Path, out: Path, px: int) -> dict[str, Any]:
    """Pack ``src`` into ``out`` with ``peer``'s own writer; its time and size, or the error."""
    try:
        require(peer)
        t0 = time.perf_counter()
        PACKERS[peer](src, out, px)
        seconds = time.perf_counter() - t0
    except Exception as e:  # a peer that cannot pack: the report says why
        return {"error": f"{type(e).__name__}: {e}"[:300]}
    return {"seconds": seconds, "bytes": disk_bytes(out), "images": len(source_files(src))}


# -- loading ----------------------------------------------------------------------------------


class GrainParse:
    """Grain map transform: one ArrayRecord record -> (image (px, px, 3) float32, label)."""

    def __init__(self, px: int) -> None:
        self.px = px

    def __call__(self, record: bytes) -> tuple[np.ndarray, np.int32]:
        label = np.frombuffer(record, np.int32, count=1)[0]
        img = np.frombuffer(record, np.float32, offset=4).reshape(self.px, self.px, 3)
        return img, label


def grain_dataset(store: Path, batch: int, px: int, seed: int) -> Any:
    import grain
    from absl import flags

    # Grain reads absl flags in its worker processes; a program that is not an absl app
    # (this one) never parses them, and Grain then refuses to start its workers
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()

    files = sorted(str(f) for f in store.glob("*.array_record"))
    source = grain.sources.ArrayRecordDataSource(files)
    return (
        grain.MapDataset.source(source)
        .shuffle(seed=seed)
        .map(GrainParse(px))
        # read ahead by samples (ReadOptions' default: 500 of them, 16 threads), then batch:
        # batched first, its 500-element buffer would hold the whole epoch (4.3 GB, measured)
        .to_iter_dataset()
        .batch(batch)
        .mp_prefetch(grain.MultiprocessingOptions(num_workers=WORKERS))
    )


def collate_xy(samples: list[dict[str, Any]]) -> tuple[Any, Any]:
    """torch's default collate of dict samples, returned as the (x, y) pair Keras trains on."""
    from torch.utils.data import default_collate

    b = default_collate(samples)
    return b["x"], b["y"]


def streaming_loader(store: Path, batch: int) -> Any:
    from streaming import StreamingDataset
    from streaming.base.util import clean_stale_shared_memory
    from torch.utils.data import DataLoader

    clean_stale_shared_memory()
    ds = StreamingDataset(local=str(store), shuffle=True, shuffle_seed=0, batch_size=batch)
    return DataLoader(
        ds, batch_size=batch, num_workers=WORKERS, collate_fn=collate_xy, persistent_workers=True
    )


def litdata_loader(store: Path, batch: int) -> Any:
    import litdata

    ds = litdata.StreamingDataset(str(store), shuffle=True, seed=0)
    return litdata.StreamingDataLoader(
        ds, batch_size=batch, num_workers=WORKERS, collate_fn=collate_xy, persistent_workers=True
    )


def webdataset_loader(store: Path, batch: int, jpeg: bool) -> Any:
    import webdataset as wds
    from torch.utils.data import DataLoader

    urls = sorted(str(f) for f in store.glob("*.tar"))
    ds = (
        wds.WebDataset(urls, shardshuffle=len(urls), empty_check=False)
        .shuffle(WDS_SHUFFLE)
        # "rgb": JPEG -> float32 HWC in [0, 1]; .npy is decoded by the default handlers
        .decode(*(["rgb"] if jpeg else []))
        .to_tuple("jpg" if jpeg else "npy", "cls")
        .batched(batch)
    )
    return DataLoader(ds, batch_size=None, num_workers=WORKERS, persistent_workers=True)


def loader(peer: str, store: Path, batch: int, px: int) -> Any:
    """What ``fit`` is given for ``peer``. Each epoch of ``fit`` reshuffles, but Grain's: Keras
    iterates the same Grain dataset afresh every epoch, and its shuffle is fixed by its seed."""
    require(peer)
    if peer == "grain":
        return grain_dataset(store, batch, px, seed=0)
    if peer == "streaming":
        return streaming_loader(store, batch)
    if peer == "litdata":
        return litdata_loader(store, batch)
    return webdataset_loader(store, batch, jpeg=peer == "webdataset jpeg")


def epochs(peer: str, store: Path, batch: int, px: int) -> Callable[[int], Iterator[Any]]:
    """``epoch(e)`` -> (x, y) numpy batches of epoch ``e``, as the peer's loader serves them."""
    require(peer)
    made = None if peer == "grain" else loader(peer, store, batch, px)

    def epoch(e: int) -> Iterator[Any]:
        # Grain's dataset is a pure function of its seed: one per epoch; the torch loaders
        # count their epochs themselves
        it = grain_dataset(store, batch, px, seed=e) if made is None else made
        for x, y in it:
            yield np.asarray(x), np.asarray(y)

    return epoch
