"""Address math, the firewall's text, Python prefixes and layer digests."""

import os
from pathlib import Path

import pytest

from sandbox_kernel.errors import ConfigError
from sandbox_kernel.runtime import layers, network
from sandbox_kernel.runtime.pyenv import merge_prefixes, python_prefixes


def test_addresses_are_a_30_per_kernel() -> None:
    one, two = network.Addresses.of(1), network.Addresses.of(2)
    assert (one.host_ip, one.kernel_ip) == ("10.213.0.5", "10.213.0.6")
    assert (two.host_ip, two.kernel_ip) == ("10.213.0.9", "10.213.0.10")
    assert one.mac == "02:5b:00:00:00:01"
    assert one.veth == "skv1"


def test_addresses_follow_the_configured_subnet(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SANDBOX_KERNEL_SUBNET", "172.30.0.0/24")
    assert network.Addresses.of(3).kernel_ip == "172.30.0.14"


def test_reservations_never_collide(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SANDBOX_KERNEL_STATE_DIR", str(tmp_path))
    first, second = network.reserve_index("a"), network.reserve_index("b")
    assert first != second
    network.release_index(first)
    assert network.reserve_index("c") == first
    assert network.reservations() == {first: "c", second: "b"}


def test_firewall_drops_kernel_to_kernel_and_kernel_to_host() -> None:
    rules = network.firewall_rules()
    assert 'iifname "skv*" oifname "skv*" drop' in rules
    assert 'iifname "skv*" ct state established,related accept' in rules
    assert "169.254.0.0/16 drop" in rules
    assert "masquerade" in rules


def test_bad_network_mode() -> None:
    with pytest.raises(ConfigError, match="network mode 'wide' is not known; use none or egress"):
        network.check_mode("wide")


def test_prefixes_drop_usr_and_nested() -> None:
    kept = merge_prefixes([Path("/opt/py"), Path("/opt/py/venv"), Path("/usr"), Path("/srv/v")])
    assert kept == [Path("/opt/py"), Path("/srv/v")]


def test_prefixes_of_a_virtualenv(tmp_path: Path) -> None:
    base = tmp_path / "base"
    (base / "bin").mkdir(parents=True)
    (base / "bin/python3").touch()
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin/python").symlink_to(base / "bin/python3")
    (venv / "pyvenv.cfg").write_text(f"home = {base / 'bin'}\n")
    assert set(python_prefixes(str(venv / "bin/python"))) == {venv, base}


def test_missing_executable() -> None:
    with pytest.raises(ConfigError, match="kernel executable '/nope/python' does not exist"):
        python_prefixes("/nope/python")


def test_digest_covers_content_and_mode(tmp_path: Path) -> None:
    tree = tmp_path / "t"
    tree.mkdir()
    (tree / "f").write_text("a")
    first = layers.digest_tree(tree)
    assert layers.digest_tree(tree) == first
    (tree / "f").write_text("b")
    second = layers.digest_tree(tree)
    assert second != first
    os.chmod(tree / "f", 0o600)
    assert layers.digest_tree(tree) != second


@pytest.mark.parametrize("name", ["", "../x", ".hidden", "a/b", "sp ace"])
def test_bad_image_names(name: str) -> None:
    with pytest.raises(ConfigError, match="image name"):
        layers.check_image_name(name)


def test_two_commits_of_one_layer_race(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another process commits the same layer between the check and the rename."""
    monkeypatch.setenv("SANDBOX_KERNEL_STATE_DIR", str(tmp_path))
    mine, theirs = layers.new_layer_tree(), layers.new_layer_tree()
    for tree in (mine, theirs):
        (tree / "tmp").mkdir()
        (tree / "tmp/f").write_text("same")
    real_rename = os.rename

    def rename_after_theirs(src: str, dst: str) -> None:
        monkeypatch.setattr(layers.os, "rename", real_rename)
        assert layers.commit_layer(theirs) == Path(dst).name
        real_rename(src, dst)

    monkeypatch.setattr(layers.os, "rename", rename_after_theirs)
    digest = layers.commit_layer(mine)
    assert (layers.layer_path(digest) / "tmp/f").read_text() == "same"
    assert not mine.exists() and not theirs.exists()
    assert [p.name for p in layers.layer_path(digest).parent.iterdir()] == [digest]
