from __future__ import annotations

import pytest

from shardfit import InvalidOptionError, PackOptions
from shardfit.pack.options import TARGET_SHARD_BYTES


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"image_size": (0, 224)}, r"image_size must be two positive ints.*Received: \(0, 224\)"),
        ({"image_size": (224,)}, "image_size must be two positive ints"),
        ({"image_size": (2.5, 3)}, "image_size must be two positive ints"),
        ({"image_size": (8, 8), "resize": "squash"}, "resize must be one of stretch, crop, pad"),
        ({"image_size": (8, 8), "dtype": "float16"}, "dtype must be one of float32, uint8"),
        ({"image_size": (8, 8), "compression": "gzip"}, "compression must be one of"),
        ({"image_size": (8, 8), "interpolation": "cubic"}, "interpolation must be one of"),
        ({"image_size": (8, 8), "val_fraction": 1.0}, r"val_fraction must be a number in \[0, 1\)"),
        ({"image_size": (8, 8), "val_fraction": -0.1}, "val_fraction must be"),
        ({"image_size": (8, 8), "shard_size": 0}, "shard_size must be a positive int"),
        ({"image_size": (8, 8), "workers": -1}, "workers must be a non-negative int"),
        ({"image_size": (8, 8), "seed": -3}, "seed must be a non-negative int"),
        ({"image_size": (8, 8), "on_error": "ignore"}, "on_error must be one of skip, raise"),
        ({"image_size": (8, 8), "class_names": ("a", "a")}, "class_names must be"),
        ({"image_size": (8, 8), "class_names": "ab"}, "class_names must be"),
        ({"image_size": (8, 8), "background": (0, 0, 256)}, "background must be three ints"),
    ],
)
def test_invalid_option_names_argument_rule_and_value(kwargs: dict, match: str) -> None:
    with pytest.raises(InvalidOptionError, match=match):
        PackOptions(**kwargs)


def test_invalid_option_is_also_a_value_error() -> None:
    with pytest.raises(ValueError):
        PackOptions(image_size=(-1, 4))


def test_options_are_frozen_and_keyword_only() -> None:
    opts = PackOptions(image_size=[4, 6])  # type: ignore[arg-type]
    assert opts.image_size == (4, 6)
    with pytest.raises(AttributeError):
        opts.seed = 3  # type: ignore[misc]
    with pytest.raises(TypeError):
        PackOptions((4, 6))  # type: ignore[misc]


def test_automatic_shard_size_targets_about_128_mib() -> None:
    opts = PackOptions(image_size=(224, 224))
    assert opts.image_bytes == 224 * 224 * 3 * 4
    shard_bytes = opts.resolved_shard_size() * opts.image_bytes
    assert 0.9 * TARGET_SHARD_BYTES < shard_bytes < 1.1 * TARGET_SHARD_BYTES
    uint8 = PackOptions(image_size=(224, 224), dtype="uint8")
    assert uint8.resolved_shard_size() == pytest.approx(4 * opts.resolved_shard_size(), rel=0.01)
    assert PackOptions(image_size=(224, 224), shard_size=7).resolved_shard_size() == 7
    huge = PackOptions(image_size=(10000, 10000))
    assert huge.resolved_shard_size() == 1
