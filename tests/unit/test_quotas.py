"""The daemon's config file and per-user quotas: parsing, who gets what, and the checks."""

import grp
from pathlib import Path

import pytest

from sandbox_kernel.errors import ConfigError, QuotaError
from sandbox_kernel.runtime import quotas
from sandbox_kernel.runtime.callers import Caller
from sandbox_kernel.runtime.limits import Limits
from sandbox_kernel.runtime.quotas import DaemonConfig, Quota, check_kernel, check_limits

UID = 123456  # in no /etc/passwd, so Caller.name is "123456"
USER = Caller(UID, UID, 1)
ROOT = Caller(0, 0, 1)
ONE = Limits.parse(memory="1G", cpus=1, pids=100, disk="1G")


@pytest.fixture(autouse=True)
def no_snapshot_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SANDBOX_KERNEL_SNAPSHOT_QUOTA", raising=False)
    monkeypatch.delenv("SANDBOX_KERNEL_SNAPSHOT_COUNT", raising=False)


def test_an_empty_config_has_the_defaults() -> None:
    config = DaemonConfig.from_dict({})
    assert config.socket == quotas.DEFAULT_SOCKET
    assert config.admin_group == ""
    assert (config.defaults, config.users, config.groups) == ({}, {}, {})
    assert config.gc_interval == 600.0


def test_quota_values_are_parsed() -> None:
    config = DaemonConfig.from_dict(
        {"quota": {"memory": "4G", "disk": "unlimited", "cpus": 2, "kernels": 3, "pids": 1024}}
    )
    assert config.defaults == {
        "memory": 4 << 30, "disk": None, "cpus": 2.0, "kernels": 3, "pids": 1024,
    }  # fmt: skip
    assert isinstance(config.defaults["cpus"], float)
    assert isinstance(config.defaults["kernels"], int)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"colour": "red"}, "colour 'red' is not a setting"),
        ({"quota": {"colour": 1}}, "quota.colour 1 is not a quota"),
        ({"quota": {"kernels": -1}}, "quota.kernels -1 is not a number of 0 or more"),
        ({"quota": {"memory": -1}}, "quota.memory -1 is too small"),
        ({"quota": {"kernels": 2.5}}, "quota.kernels 2.5 is not a whole number"),
        ({"quota": {"pids": True}}, "quota.pids True is not a number"),
        ({"quota": {"memory": True}}, "quota.memory True is not a size"),
        # a float size (TOML `memory = 1.5`) must be a ConfigError too, not a TypeError
        ({"quota": {"memory": 1.5}}, "quota.memory 1.5 "),
        ({"users": {"bob": {"cpus": -2}}}, r"users.bob.cpus -2 is not a number"),
        ({"socket": 5}, "socket 5 must be a string"),
        ({"socket": "daemon.sock"}, "socket 'daemon.sock' must be an absolute path"),
    ],
)
def test_bad_values_are_refused_by_name(data: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        DaemonConfig.from_dict(data)


def test_load_refuses_a_missing_explicit_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.toml' does not exist"):
        DaemonConfig.load(tmp_path / "nope.toml")


def test_load_without_a_file_gives_the_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(quotas, "DEFAULT_CONFIG", tmp_path / "absent.toml")
    assert DaemonConfig.load(None) == DaemonConfig()


def test_load_names_a_file_of_bad_toml(tmp_path: Path) -> None:
    path = tmp_path / "daemon.toml"
    path.write_text("[quota\nkernels = ")
    with pytest.raises(ConfigError, match=r"daemon\.toml' cannot be read"):
        DaemonConfig.load(path)


def test_load_reads_a_file(tmp_path: Path) -> None:
    path = tmp_path / "daemon.toml"
    path.write_text(
        'socket = "/tmp/d.sock"\nadmin_group = "staff"\n'
        '[quota]\nkernels = 4\nmemory_total = "8G"\n[users."12345"]\nkernels = 9\n'
    )
    config = DaemonConfig.load(path)
    assert (config.socket, config.admin_group) == ("/tmp/d.sock", "staff")
    assert config.defaults == {"kernels": 4, "memory_total": 8 << 30}
    assert config.users == {"12345": {"kernels": 9}}
    path.write_text("[quota]\nkernels = -3\n")
    with pytest.raises(ConfigError, match=r"daemon\.toml: quota\.kernels -3"):
        DaemonConfig.load(path)


CONFIG = {
    "quota": {"kernels": 4, "memory": "4G"},
    "groups": {"4242": {"kernels": 6, "cpus": 2}, "4343": {"kernels": 8, "cpus": "unlimited"}},
    "users": {str(UID + 1): {"kernels": 1, "snapshots": 5}},
}


def test_root_has_no_quotas() -> None:
    assert DaemonConfig.from_dict(CONFIG).quota_for(ROOT) == Quota()


def test_a_user_gets_the_defaults_and_the_snapshot_store_quota() -> None:
    quota = DaemonConfig.from_dict(CONFIG).quota_for(USER)
    assert quota == Quota(
        kernels=4, memory=4 << 30, snapshot_bytes=20 << 30, snapshots=100,
    )  # fmt: skip


def test_snapshot_quota_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SANDBOX_KERNEL_SNAPSHOT_QUOTA", "5G")
    monkeypatch.setenv("SANDBOX_KERNEL_SNAPSHOT_COUNT", "7")
    quota = DaemonConfig.from_dict({}).quota_for(USER)
    assert (quota.snapshot_bytes, quota.snapshots) == (5 << 30, 7)
    config = DaemonConfig.from_dict({"quota": {"snapshot_bytes": "1G", "snapshots": 3}})
    assert (config.quota_for(USER).snapshot_bytes, config.quota_for(USER).snapshots) == (
        1 << 30, 3,
    )  # fmt: skip


def test_a_users_own_entry_beats_defaults_and_groups() -> None:
    quota = DaemonConfig.from_dict(CONFIG).quota_for(Caller(UID + 1, UID, 1, (4242,)))
    assert (quota.kernels, quota.snapshots, quota.cpus, quota.memory) == (1, 5, 2.0, 4 << 30)


def test_a_group_member_gets_the_groups_value() -> None:
    quota = DaemonConfig.from_dict(CONFIG).quota_for(Caller(UID, UID, 1, (4242,)))
    assert (quota.kernels, quota.cpus) == (6, 2.0)
    assert DaemonConfig.from_dict(CONFIG).quota_for(Caller(UID, 4242, 1)).kernels == 6


def test_of_two_groups_the_larger_and_unlimited_win() -> None:
    config = DaemonConfig.from_dict(CONFIG)
    quota = config.quota_for(Caller(UID, UID, 1, (4242, 4343)))
    assert (quota.kernels, quota.cpus) == (8, None)
    assert config.quota_for(Caller(UID, UID, 1, (4343, 4242))).cpus is None


def test_is_admin() -> None:
    config = DaemonConfig.from_dict({"admin_group": grp.getgrgid(0).gr_name})
    assert config.is_admin(ROOT)
    assert config.is_admin(Caller(UID, 0, 1))
    assert config.is_admin(Caller(UID, UID, 1, (0,)))
    assert not config.is_admin(USER)
    assert not DaemonConfig().is_admin(Caller(UID, 0, 1))


def test_who_may_teach() -> None:
    config = DaemonConfig.from_dict({"teacher_group": grp.getgrgid(0).gr_name})
    assert config.may_teach(ROOT)
    assert config.may_teach(Caller(UID, UID, 1, (0,)))
    assert not config.may_teach(USER)
    # Without a teacher group: root and admins only.
    assert not DaemonConfig().may_teach(USER)
    assert DaemonConfig.from_dict({"admin_group": grp.getgrgid(0).gr_name}).may_teach(
        Caller(UID, 0, 1)
    )
    with pytest.raises(ConfigError, match="teacher_group"):
        DaemonConfig.from_dict({"teacher_group": 7})


def test_the_next_kernel_beyond_the_count_is_refused() -> None:
    quota = Quota(kernels=2)
    check_kernel(quota, ONE, [ONE])
    with pytest.raises(QuotaError, match="quota kernels = 2: you have 2 kernels running"):
        check_kernel(quota, ONE, [ONE, ONE])
    with pytest.raises(QuotaError, match="quota kernels = 0"):
        check_kernel(Quota(kernels=0), ONE, [])


def test_memory_above_the_per_kernel_max_is_refused() -> None:
    with pytest.raises(QuotaError, match="quota memory = 512M: a kernel asked for memory 1G"):
        check_limits(Quota(memory=512 << 20), ONE, [])


def test_unlimited_memory_is_refused_under_a_memory_quota() -> None:
    with pytest.raises(QuotaError, match=r"quota memory = 4G: .* unlimited memory"):
        check_limits(Quota(memory=4 << 30), Limits(), [])
    with pytest.raises(QuotaError, match=r"quota memory_total = 4G: .* unlimited memory"):
        check_limits(Quota(memory_total=4 << 30), Limits(), [])


def test_memory_total_counts_the_other_kernels() -> None:
    quota = Quota(memory_total=3 << 30)
    check_limits(quota, ONE, [ONE, ONE])
    with pytest.raises(QuotaError, match=r"quota memory_total = 3G: .* add up to 4G"):
        check_limits(quota, ONE, [ONE, ONE, ONE])
    with pytest.raises(QuotaError, match="quota memory_total = 3G"):
        check_limits(quota, ONE, [Limits()])  # an unlimited one counts as all of it


@pytest.mark.parametrize(
    ("quota", "message"),
    [
        (Quota(cpus=0.5), "quota cpus = 0.5: a kernel asked for cpus 1"),
        (Quota(pids=50), "quota pids = 50: a kernel asked for pids 100"),
        (Quota(disk=512 << 20), "quota disk = 512M: a kernel asked for disk 1G"),
    ],
)
def test_cpus_pids_and_disk_maxima(quota: Quota, message: str) -> None:
    with pytest.raises(QuotaError, match=message):
        check_kernel(quota, ONE, [])


def test_everything_within_quotas_passes() -> None:
    quota = Quota(kernels=2, memory_total=2 << 30, memory=1 << 30, cpus=1, pids=100, disk=1 << 30)
    check_kernel(quota, ONE, [ONE])
    check_kernel(Quota(), Limits(), [ONE] * 50)
