"""``shardfit.BackupAndRestore``: Keras's ``BackupAndRestore``, resuming mid-epoch exactly.

Keras's callback saves the weights every ``save_freq`` batches but restores only the epoch
number: a run killed at batch 900 of 1,000 trains those 900 batches again, on other samples.
This one also saves where the ``Sequence`` stands in its epoch plan (the batches trained, not
those read ahead), and on restore tells the ``Sequence`` to serve the rest of that epoch first
(:meth:`shardfit.Sequence.resume_at`): the rerun trains exactly the batches an uninterrupted run
would have trained next, then the same later epochs.

How the shorter first epoch is made: Keras runs ``len(seq)`` steps per epoch, read once when
``fit`` starts, and starts a new iterator over the dataset for each epoch, which reads the
dataset's length again. Right after ``resume_at``, the Sequence's length is what is left of the
resumed epoch, so that iterator ends there; Keras then ends the epoch as when data runs out
(its "ran out of data" warning is silenced for that epoch alone, as the shortfall is meant), and
later epochs are whole.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from typing import Any

import keras

from shardfit.errors import InvalidOptionError
from shardfit.keras._sequence import Sequence
from shardfit.store._format import write_json_atomic

__all__ = ["BackupAndRestore"]

#: Key of shardfit's entry in Keras's training metadata file.
_KEY = "shardfit"
#: Keras's warning when an epoch's iterator ends before its steps do.
_RAN_OUT = "Your input ran out of data"


class BackupAndRestore(keras.callbacks.BackupAndRestore):  # type: ignore[misc]
    """A drop-in for ``keras.callbacks.BackupAndRestore`` that also restores the data position.

    Args:
        backup_dir: the folder of the backup (weights and metadata), local; as Keras's.
        sequence: the :class:`~shardfit.Sequence` passed to ``fit`` as its training data.
        save_freq, double_checkpoint, delete_checkpoint: as Keras's.

    Use it as Keras's: rerun the same script after an interruption, and ``fit`` goes on from
    the last backup. Requires ``fit`` without ``steps_per_epoch`` (each epoch one pass through
    the data).

    Raises:
        InvalidOptionError: ``sequence`` is not a Sequence; at ``fit``, ``steps_per_epoch``
            differs from the Sequence's length, or the backup was made with other data
            (another store, seed or batch size).
    """

    def __init__(
        self,
        backup_dir: str | os.PathLike[str],
        sequence: Sequence,
        save_freq: str | int = "epoch",
        double_checkpoint: bool = False,
        delete_checkpoint: bool = True,
    ) -> None:
        if not isinstance(sequence, Sequence):
            raise InvalidOptionError(
                f"sequence must be the shardfit.Sequence that fit trains on. Received: {sequence!r}"
            )
        super().__init__(
            os.fspath(backup_dir),
            save_freq=save_freq,
            double_checkpoint=double_checkpoint,
            delete_checkpoint=delete_checkpoint,
        )
        self.sequence = sequence
        self._offset = 0  # batches of the current epoch trained before this fit resumed it
        self._trained = 0  # batches of the current epoch trained, in all
        self._quiet: warnings.catch_warnings[None] | None = None  # silences "ran out of data"
        #: ``(epoch, batch)`` the last ``fit`` resumed at from the backup, or ``None``
        self.resumed_at: tuple[int, int] | None = None

    # -- restore -------------------------------------------------------------------------------

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        steps = (self.params or {}).get("steps")
        if steps is not None and steps != self.sequence.batches_per_epoch:
            raise InvalidOptionError(
                "shardfit.BackupAndRestore needs fit to run whole epochs of the Sequence: "
                f"steps_per_epoch must be None (or {self.sequence.batches_per_epoch}). "
                f"Received: {steps}"
            )
        super().on_train_begin(logs)  # weights, and the epoch to start at
        self._offset = 0
        self.resumed_at = None
        saved = self._saved_position()
        if saved is None:
            return
        self._check_same_data(saved)
        epoch, position = int(saved["epoch"]), int(saved["position"])
        if position >= self.sequence.batches_per_epoch:  # saved at the end of an epoch
            epoch, position = epoch + 1, 0
        self.model._initial_epoch = epoch
        self.sequence.resume_at(epoch, position)
        self.resumed_at = (epoch, position)
        self._offset = position
        if position:
            self._quiet = warnings.catch_warnings()
            self._quiet.__enter__()
            warnings.filterwarnings("ignore", message=_RAN_OUT, category=UserWarning)

    def _saved_position(self) -> dict[str, Any] | None:
        try:
            with open(self._training_metadata_path, encoding="utf-8") as f:
                saved = json.load(f).get(_KEY)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, AttributeError) as err:
            raise InvalidOptionError(
                f"cannot read the backup {self._training_metadata_path}: {err}. Remove "
                f"{self.backup_dir} to start over"
            ) from None
        return saved if isinstance(saved, dict) else None

    def _identity(self) -> dict[str, Any]:
        seq = self.sequence
        return {
            "store": seq._reader.path,
            "split": seq._reader.split,
            "num_samples": seq.num_samples,
            # the steps of an epoch are global batches: a job resumed on another number of
            # workers (num_shards) with the same global batch goes on where it stood
            "global_batch_size": seq.options.batch_size * seq.options.num_shards,
            "seed": seq.options.seed,
            "shuffle": seq.shuffle,
            "shuffle_window": seq.options.shuffle_window,
        }

    def _check_same_data(self, saved: dict[str, Any]) -> None:
        mine = self._identity()
        if "global_batch_size" not in saved and "batch_size" in saved:  # made before num_shards
            saved = {**saved, "global_batch_size": saved["batch_size"]}
        differ = [k for k, v in mine.items() if saved.get(k) != v]
        if differ:
            raise InvalidOptionError(
                f"the backup in {self.backup_dir} was made with other data ("
                + ", ".join(f"{k}: {saved.get(k)!r}, now {mine[k]!r}" for k in differ)
                + f"): resume with the same Sequence, or remove {self.backup_dir} to start over"
            )

    # -- count what is trained -------------------------------------------------------------------

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        # Keras's callback learns the epoch only when one ends, so that a backup made in the
        # first epoch of a resumed run would name epoch 0
        self._current_epoch = epoch
        self._trained = self._offset

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        self._trained = self._offset + batch + 1
        super().on_train_batch_end(batch, logs)

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        # Keras's callback now names the next epoch, and backs up if save_freq="epoch": that
        # backup resumes at its first batch
        self._trained = 0
        self._offset = 0
        self._loud()
        super().on_epoch_end(epoch, logs)

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        self._loud()
        super().on_train_end(logs)

    def _loud(self) -> None:
        if self._quiet is not None:
            self._quiet.__exit__(None, None, None)
            self._quiet = None

    # -- save --------------------------------------------------------------------------------

    def _save_model(self) -> None:
        """Keras's backup (the weights, then the metadata), with the data position written
        into the metadata file in the same replace, so that the two always match."""
        os.makedirs(self.backup_dir, exist_ok=True)
        if self.double_checkpoint and os.path.exists(self._weights_path):
            shutil.copyfile(self._weights_path, self._prev_weights_path)
        if self.double_checkpoint and os.path.exists(self._training_metadata_path):
            shutil.copyfile(self._training_metadata_path, self._prev_training_metadata_path)
        self.model.save_weights(filepath=self._weights_path, overwrite=True)
        epoch = self._current_epoch
        metadata = {
            "epoch": epoch,
            "batch": self._last_batch_seen,
            _KEY: {"epoch": epoch, "position": self._trained, **self._identity()},
        }
        write_json_atomic(self._training_metadata_path, metadata)
