"""The epoch bookkeeping (EpochCursor) against call patterns recorded from Keras 3.15's ``fit``,
``predict`` and ``evaluate`` on a 4-batch PyDataset, replayed without any framework.

Each table was recorded by logging ``__getitem__`` indices and the two hooks of a plain
PyDataset under the TensorFlow backend (in-process and with 2 threads gave the same tables).
``tests/test_sequence.py`` pins the same behaviour under real ``fit``.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from shardfit.read._order import EpochCursor

# a request is its batch index; "begin" and "end" are on_epoch_begin and on_epoch_end
RECORDED = {
    # Keras asks for batches 0 and 1 to build its tensor signature, resets (a first
    # on_epoch_end), then runs each epoch between begin and end
    "fit(epochs=2, shuffle=False)": [
        0,
        1,
        "end",
        "begin",
        0,
        1,
        2,
        3,
        "end",
        "begin",
        0,
        1,
        2,
        3,
        "end",
    ],
    "fit(epochs=2, shuffle=True)": [
        0,
        1,
        "end",
        "begin",
        2,
        3,
        1,
        0,
        "end",
        "begin",
        0,
        2,
        1,
        3,
        "end",
    ],
    # predict probes too, but calls no on_epoch_end before its pass
    "predict": [0, 1, "begin", 0, 1, 2, 3, "end"],
    "evaluate": [0, 1, "end", "begin", 0, 1, 2, 3, "end"],
    "fit(epochs=1) twice": [
        0,
        1,
        "end",
        "begin",
        0,
        1,
        2,
        3,
        "end",
        0,
        1,
        "end",
        "begin",
        0,
        1,
        2,
        3,
        "end",
    ],
    # not seen in the recordings above, but possible with TensorFlow's prefetch and no
    # workers: the next epoch's first batches asked for before on_epoch_end of the last
    "fit(epochs=2), early prefetch": [
        0,
        1,
        "end",
        "begin",
        0,
        1,
        2,
        3,
        0,
        1,
        "end",
        "begin",
        2,
        3,
        "end",
    ],
}

# the epoch each request of the table above is served from (None: a thrown-away probe, which
# may be served from any epoch but must not count)
EXPECTED = {
    "fit(epochs=2, shuffle=False)": [None, None, 0, 0, 0, 0, 1, 1, 1, 1],
    "fit(epochs=2, shuffle=True)": [None, None, 0, 0, 0, 0, 1, 1, 1, 1],
    "predict": [None, None, 0, 0, 0, 0],
    "evaluate": [None, None, 0, 0, 0, 0],
    "fit(epochs=1) twice": [None, None, 0, 0, 0, 0, None, None, 1, 1, 1, 1],
    "fit(epochs=2), early prefetch": [None, None, 0, 0, 0, 0, 1, 1, 1, 1],
}

AFTER = {  # the cursor's epoch once the whole pattern has run
    "fit(epochs=2, shuffle=False)": 2,
    "fit(epochs=2, shuffle=True)": 2,
    "predict": 1,
    "evaluate": 1,
    "fit(epochs=1) twice": 2,
    "fit(epochs=2), early prefetch": 2,
}


def _cursor(**kw: object) -> EpochCursor:
    args: dict[str, object] = dict(
        num_samples=16,
        shard_size=4,
        batch_size=4,
        drop_remainder=False,
        seed=3,
        shuffle=True,
        window=2,
    )
    args.update(kw)
    return EpochCursor(**args)  # type: ignore[arg-type]


def _served(cursor: EpochCursor, events: list[object]) -> list[tuple[int, int]]:
    """Replay ``events``; return ``(epoch, batch)`` served for each request."""
    served = []
    for e in events:
        if e == "end":
            cursor.epoch_end()
        elif e == "begin":
            cursor.epoch_begin()
        else:
            served.append(cursor.request(int(e)).key)  # type: ignore[call-overload]
    return served


def _replay(cursor: EpochCursor, events: list[object]) -> list[int]:
    return [epoch for epoch, _ in _served(cursor, events)]


@pytest.mark.parametrize("pattern", sorted(RECORDED))
def test_each_recorded_keras_pattern_serves_every_batch_once_per_epoch(pattern: str) -> None:
    cursor = _cursor()
    epochs = _replay(cursor, RECORDED[pattern])
    want = EXPECTED[pattern]
    assert [e for e, w in zip(epochs, want, strict=True) if w is not None] == [
        w for w in want if w is not None
    ]
    assert cursor.epoch == AFTER[pattern]


@pytest.mark.parametrize("pattern", sorted(RECORDED))
def test_within_an_epoch_the_plan_is_served_in_order_whatever_index_keras_asks(
    pattern: str,
) -> None:
    events = RECORDED[pattern]
    served = _served(_cursor(), events)
    inside = []
    within = False
    for e in events:  # which requests were made between begin and end
        if e in ("begin", "end"):
            within = e == "begin"
        else:
            inside.append(within)
    streamed = [key for key, is_in in zip(served, inside, strict=True) if is_in]
    assert [b for _, b in streamed] == [i % 4 for i in range(len(streamed))]


def test_fit_with_keras_shuffle_and_without_serve_the_same_batches() -> None:
    shuffled = _served(_cursor(), RECORDED["fit(epochs=2, shuffle=True)"])
    plain = _served(_cursor(), RECORDED["fit(epochs=2, shuffle=False)"])
    assert (
        shuffled[2:]
        == plain[2:]
        == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1), (1, 2), (1, 3)]
    )


def test_requests_carry_the_plan_and_upcoming_batches_cross_into_the_next_epoch() -> None:
    cursor = _cursor()
    order = cursor.order(0)
    req = cursor.request(1)  # outside an epoch: by index, moving nothing
    assert req.key == (0, 1) and not req.streamed
    np.testing.assert_array_equal(req.samples, order[4:8])
    assert cursor.upcoming(3) == []  # nothing is read ahead outside an epoch
    cursor.epoch_begin()
    for _ in range(3):
        cursor.request(0)
    assert [r.key for r in cursor.upcoming(3)] == [(0, 3), (1, 0), (1, 1)]
    np.testing.assert_array_equal(cursor.upcoming(2)[1].samples, cursor.order(1)[:4])
    assert sorted(np.concatenate([cursor.samples(i, 0) for i in range(4)])) == list(range(16))


def test_steps_per_epoch_below_the_length_walks_on_through_the_plan() -> None:
    # fit(steps_per_epoch=3) on 4 batches: Keras keeps one iterator across its epochs
    cursor = _cursor()
    events = [0, 1, "end"] + ["begin", 0, 1, 2, "end"] * 3
    assert _served(cursor, events)[2:] == [
        (0, 0),
        (0, 1),
        (0, 2),
        (0, 3),
        (1, 0),
        (1, 1),
        (1, 2),
        (1, 3),
        (2, 0),
    ]


def test_keras_process_pool_counts_epochs_by_hook_calls() -> None:
    # Keras's pool builds the batches in processes it forks after each on_epoch_end: the owner
    # never sees the requests, and the first hook call comes before epoch 0
    cursor = _cursor(count_hooks=True)
    seen = []
    for _ in range(3):
        cursor.epoch_end()
        seen.append(cursor.epoch)
    assert seen == [0, 1, 2]


def test_initial_epoch_starts_the_count_there() -> None:
    cursor = _cursor(initial_epoch=5)
    assert _replay(cursor, RECORDED["fit(epochs=2, shuffle=False)"])[2:] == [5] * 4 + [6] * 4


def test_an_index_outside_the_epoch_is_an_index_error() -> None:
    cursor = _cursor()
    for bad in (-1, 4, 1.0, "0"):
        with pytest.raises(IndexError, match=r"batch index must be in \[0, 4\)"):
            cursor.request(bad)  # type: ignore[arg-type]


def test_a_cursor_pickles_small_and_keeps_its_epoch() -> None:
    cursor = _cursor(num_samples=1_000_000, shard_size=1000)
    cursor.order(0)  # the cached plan does not travel
    cursor.epoch_end()
    _replay(cursor, [0, 1, 2])
    blob = pickle.dumps(cursor)
    assert len(blob) < 1000
    copy = pickle.loads(blob)
    assert copy.epoch == cursor.epoch
    np.testing.assert_array_equal(copy.samples(3, 2), cursor.samples(3, 2))
