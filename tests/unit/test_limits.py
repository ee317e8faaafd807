"""Parsing and formatting of limits: the messages a user sees for bad values."""

import pytest

from sandbox_kernel.display import format_size
from sandbox_kernel.errors import ConfigError
from sandbox_kernel.runtime.limits import Limits, parse_cpus, parse_pids, parse_size


@pytest.mark.parametrize(
    ("text", "size"),
    [("2G", 2 << 30), ("512M", 512 << 20), ("1.5G", 3 << 29), ("64m", 64 << 20),
     ("1073741824", 1 << 30), ("2GiB", 2 << 30), ("100MB", 100 << 20), (4096, 4096)],
)  # fmt: skip
def test_sizes(text: str, size: int) -> None:
    assert parse_size(text) == size


def test_a_word_is_not_a_size() -> None:
    with pytest.raises(ConfigError) as err:
        parse_size("lots")
    assert str(err.value) == (
        "memory limit 'lots' is not a size; use a number with K, M or G, e.g. 2G"
    )


def test_memory_below_the_minimum_names_it() -> None:
    with pytest.raises(ConfigError, match="too small; use at least 64M"):
        Limits.parse(memory="1M")


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "two", ""])
def test_bad_cpus(value: str) -> None:
    with pytest.raises(ConfigError, match="cpu limit"):
        parse_cpus(value)


def test_cpus() -> None:
    assert parse_cpus("1.5") == 1.5
    assert parse_cpus(2) == 2.0


@pytest.mark.parametrize("value", ["0", "8", "many", "1.5"])
def test_bad_pids(value: str) -> None:
    with pytest.raises(ConfigError, match="pids limit"):
        parse_pids(value)


def test_empty_means_unlimited() -> None:
    assert Limits.parse(memory="", cpus=None, pids="", disk=None) == Limits()


def test_merged_keeps_what_is_not_changed() -> None:
    base = Limits.parse(memory="1G", cpus="1", pids="100", disk="5G")
    new = base.merged(Limits(memory=2 << 30))
    assert new == Limits(memory=2 << 30, cpus=1.0, pids=100, disk=5 << 30)


def test_round_trip_through_plain_data() -> None:
    limits = Limits.parse(memory="1G", cpus="0.5", pids="64", disk="1G")
    assert Limits.from_dict(limits.to_dict()) == limits


@pytest.mark.parametrize(
    ("size", "text"), [(None, "-"), (512, "512B"), (3 << 30, "3G"), (1536 << 20, "1.5G")]
)
def test_format_size(size: int | None, text: str) -> None:
    assert format_size(size) == text
