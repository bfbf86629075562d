"""Which Keras call is asking for batches: ``fit``, ``evaluate`` or ``predict``, and its arguments.

A ``PyDataset`` is never told why it is iterated: its hooks take no arguments, and Keras asks for
batches the same way for training and inference. But the trainer's own method is on the calling
thread's stack whenever Keras calls a dataset hook or reads its length (``EpochIterator`` does both
from the thread that runs ``fit``, ``evaluate`` or ``predict``, under every backend), and its
locals hold what the user passed (``initial_epoch``, ``steps_per_epoch``, ``steps``) and the
epoch under way (``epoch``, set before ``on_epoch_begin``). Reading them there is how a
Sequence serves inference in store order, follows ``fit(initial_epoch=k)`` and walks on through
the plan under ``steps_per_epoch``. Keras 3.15's layout, pinned by ``tests/test_calls.py``
under real ``fit``, ``evaluate`` and ``predict``: a Keras that changes it fails those tests.

Batches themselves may be asked for from other threads (TensorFlow's ``from_generator``, Keras's
workers): only the hooks and the length are read from the caller's stack.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from types import FrameType
from typing import Literal

__all__ = ["KerasCall", "keras_call"]

CallKind = Literal["fit", "evaluate", "predict"]
_METHODS = ("fit", "evaluate", "predict")
_BUILD = ("_symbolic_build", "_maybe_symbolic_build")


@dataclass(frozen=True)
class KerasCall:
    """The innermost Keras trainer call on this thread's stack.

    Attributes:
        kind: ``"fit"``, ``"evaluate"`` (also fit's validation pass) or ``"predict"``.
        epoch: under ``fit``, the Keras epoch under way (``None`` before the first).
        initial_epoch: under ``fit``, the epoch it starts at (after a Keras
            ``BackupAndRestore`` has set it).
        steps: ``steps_per_epoch`` under ``fit``, ``steps`` under ``evaluate`` and
            ``predict`` (``None``: one pass through the data).
        new_iterator: Keras is making the call's ``EpochIterator`` (it reads the dataset's
            length there first): a new call begins.
        building: Keras is taking a batch to build the model (``_symbolic_build``, on the first
            call with an unbuilt model under JAX and PyTorch): it begins an epoch, takes a
            batch, and ends the epoch again (``EpochIterator.reset``) before the real one.
    """

    kind: CallKind
    epoch: int | None = None
    initial_epoch: int | None = None
    steps: int | None = None
    building: bool = False
    new_iterator: bool = False


def keras_call(frame: FrameType | None = None) -> KerasCall | None:
    """The Keras ``fit``, ``evaluate`` or ``predict`` running on this thread, innermost first
    (``evaluate`` inside ``fit`` is fit's validation); ``None`` outside them (a user's loop,
    ``train_on_batch``)."""
    f: FrameType | None = sys._getframe(1) if frame is None else frame
    building = new_iterator = False
    while f is not None:
        name = f.f_code.co_name
        if name in _BUILD and _is_keras_trainer(f):
            building = True
        elif name == "__init__" and _in_keras(f, "epoch_iterator.py"):
            new_iterator = True
        elif name in _METHODS and _is_keras_trainer(f):
            local = f.f_locals
            if name == "fit":
                return KerasCall(
                    "fit",
                    epoch=_int_or_none(local.get("epoch")),
                    initial_epoch=_int_or_none(local.get("initial_epoch")),
                    steps=_int_or_none(local.get("steps_per_epoch")),
                    building=building,
                    new_iterator=new_iterator,
                )
            steps = _int_or_none(local.get("steps"))
            return KerasCall(
                name,  # type: ignore[arg-type]
                steps=steps,
                building=building,
                new_iterator=new_iterator,
            )
        f = f.f_back
    return None


def _in_keras(frame: FrameType, module: str) -> bool:
    filename = frame.f_code.co_filename.replace("\\", "/")
    return "/keras/src/" in filename and filename.endswith(module)


def _is_keras_trainer(frame: FrameType) -> bool:
    """The frame runs Keras's own trainer method (not a user's method of the same name)."""
    return _in_keras(frame, "trainer.py") and "self" in frame.f_locals


def _int_or_none(value: object) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value
