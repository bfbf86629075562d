#!/usr/bin/env python3
"""Train a small CNN with shardfit.Sequence: the end-to-end demo and the project's main job.

With no arguments: makes a synthetic image folder (shapes as classes) in ``--workdir``, packs it,
and trains on ``Sequence(..., workers=2, use_multiprocessing=True)`` with validation data and
the usual callbacks, then prints the final validation accuracy. ``--data PATH.zarr`` trains on a
store you packed (it needs a ``val`` split: pack with ``--val-fraction``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def _ensure_importable() -> None:
    try:
        import shardfit  # noqa: F401
    except ImportError:  # run from a checkout without `pip install -e .`
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build_model(input_shape: tuple[int, int, int], num_classes: int):  # type: ignore[no-untyped-def]
    import keras

    inputs = keras.Input(input_shape)
    x = inputs
    for filters in (16, 32, 64):
        x = keras.layers.Conv2D(filters, 3, padding="same", activation="relu")(x)
        x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.GlobalMaxPooling2D()(x)
    x = keras.layers.Dense(64, activation="relu")(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax")(x)
    model = keras.Model(inputs, outputs)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    return model


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", help="a packed store (default: make and pack a synthetic one)")
    p.add_argument("--workdir", default="example_data", help="where the synthetic data goes")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    _ensure_importable()
    import shardfit

    started = time.perf_counter()
    data = args.data
    if data is None:
        from shardfit.examples import make_shapes_folder

        folder = os.path.join(args.workdir, "shapes")
        data = os.path.join(args.workdir, "shapes.zarr")
        if not os.path.isdir(folder):
            make_shapes_folder(folder, per_class=400, size=64, seed=args.seed)
            print(f"made {folder}: 1200 images, 3 classes")
        if not os.path.exists(data):
            report = shardfit.pack_images(
                folder, data, image_size=(64, 64), val_fraction=0.2, seed=args.seed, progress=True
            )
            print(f"packed {data}: {report.counts}")
    try:
        info = shardfit.read_info(data)
        if "val" not in info.splits:
            print(
                f"train.py: error: {data} has no 'val' split; pack it with --val-fraction",
                file=sys.stderr,
            )
            return 2
    except shardfit.ShardfitError as err:
        print(f"train.py: error: {err}", file=sys.stderr)
        return 2

    import keras

    keras.utils.set_random_seed(args.seed)
    train = shardfit.Sequence(
        data,
        "train",
        batch_size=args.batch_size,
        seed=args.seed,
        workers=args.workers,
        use_multiprocessing=True,
        max_queue_size=8,
    )
    val = shardfit.Sequence(data, "val", batch_size=64, shuffle=False)
    model = build_model((*info.image_size, 3), len(info.class_names))
    logdir = os.path.join(args.workdir, "logs")
    history = model.fit(
        train,
        validation_data=val,
        epochs=args.epochs,
        verbose=2,
        callbacks=[
            keras.callbacks.ModelCheckpoint(
                os.path.join(args.workdir, "best.keras"),
                monitor="val_accuracy",
                save_best_only=True,
            ),
            keras.callbacks.EarlyStopping(
                monitor="val_accuracy", patience=3, restore_best_weights=True
            ),
            keras.callbacks.ReduceLROnPlateau(monitor="val_loss", patience=2, factor=0.5),
            keras.callbacks.TensorBoard(logdir),
        ],
    )
    _, accuracy = model.evaluate(val, verbose=0)
    print(f"classes: {', '.join(info.class_names)}")
    seconds = time.perf_counter() - started
    print(f"epochs run: {len(history.history['loss'])}; total time {seconds:.0f} s")
    print(f"final validation accuracy: {accuracy:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
