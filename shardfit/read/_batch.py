"""Build one batch's images: read the samples, then apply the seeded transform.

The same code runs in the consumer's process (no workers, threads) and in shardfit's worker
processes, so a batch is the same wherever it is made.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from shardfit.errors import InvalidOptionError, TransformError
from shardfit.read._reader import ShardGetter, SplitReader
from shardfit.transforms import Transform

__all__ = ["BatchMaker", "transform_rng"]

#: Stream id of the transform generators (see _epoch for the others).
_TRANSFORM_STREAM = 0x5348_0003


def transform_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator a transform gets for batch ``index`` of ``epoch``."""
    return np.random.default_rng([seed, _TRANSFORM_STREAM, epoch, index])


@dataclass(frozen=True)
class BatchMaker:
    """What a process needs to build batches: the reader (opened lazily in each process), the
    transform, and the seed. Pickles small (the transform must pickle for spawned workers)."""

    reader: SplitReader
    transform: Transform | None
    seed: int

    def check_picklable(self, where: str) -> None:
        """Raise a clear error if the transform cannot travel to ``where`` (a phrase): a maker
        that arrived without it would silently build batches without augmentation."""
        if self.transform is None:
            return
        try:
            pickle.dumps(self.transform)
        except Exception as err:
            raise InvalidOptionError(
                f"transform must pickle to run in {where} (define it at module level, or use "
                f"shardfit.transforms). Received: {self.transform!r} ({err})"
            ) from None

    def images(
        self,
        samples: npt.NDArray[np.int64],
        epoch: int,
        index: int,
        out: Callable[[tuple[int, ...]], npt.NDArray[np.float32]],
        shards: ShardGetter | None = None,
    ) -> npt.NDArray[Any]:
        """The images of batch ``index`` of ``epoch``: ``samples`` read into ``out(shape)``
        (from the files, or from shards already in memory that ``shards`` gives), then
        transformed (the result may be ``out``'s array or a new one)."""
        images = out((samples.size, *self.reader.image_shape))
        self.reader.read_into(samples, images, shards=shards)
        if self.transform is None:
            return images
        result = self.transform(images, transform_rng(self.seed, epoch, index))
        if (
            not isinstance(result, np.ndarray)
            or result.ndim < 1
            or result.shape[0] != images.shape[0]
        ):
            got = getattr(result, "shape", type(result).__name__)
            raise TransformError(
                f"transform must return a numpy array with the batch's {images.shape[0]} "
                f"images first. Received: {got} from {self.transform!r}"
            )
        return result
