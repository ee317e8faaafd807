"""A kernel's network: its own namespace, a veth pair to the host, and the firewall.

Each kernel gets a /30 of the kernel subnet: the host's end of the veth has the
first address, the kernel the second. The kernel's MAC address is derived from the
same index, so it stays the same across restarts and restores (a new MAC leaves the
host's ARP entry stale). An nftables table keeps kernels from reaching each other
and the host's services; with ``egress`` a kernel also gets NAT to the outside.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from sandbox_kernel.errors import ConfigError, SandboxError

from . import paths
from .process import run

NETWORK_MODES = ("none", "egress")
NETNS_DIR = Path("/var/run/netns")
TABLE = "sandbox_kernel"
VETH_PREFIX = "skv"


def kernel_subnet() -> ipaddress.IPv4Network:
    """The block kernels' /30s come from: ``$SANDBOX_KERNEL_SUBNET``, default 10.213.0.0/16."""
    return ipaddress.IPv4Network(os.environ.get("SANDBOX_KERNEL_SUBNET", "10.213.0.0/16"))


def check_mode(mode: str) -> str:
    """Validate a network mode.

    Raises:
        ConfigError: the mode is not ``none`` or ``egress``.
    """
    if mode not in NETWORK_MODES:
        raise ConfigError("network mode", mode, "is not known; use none or egress")
    return mode


@dataclass(frozen=True)
class Addresses:
    """The addresses of kernel number ``index``: host end, kernel end, the kernel's MAC."""

    index: int
    host_ip: str
    kernel_ip: str
    mac: str
    veth: str

    @classmethod
    def of(cls, index: int) -> Addresses:
        subnet = kernel_subnet()
        base = int(subnet.network_address) + 4 * index
        return cls(
            index=index,
            host_ip=str(ipaddress.IPv4Address(base + 1)),
            kernel_ip=str(ipaddress.IPv4Address(base + 2)),
            mac="02:5b:" + ":".join(f"{b:02x}" for b in index.to_bytes(4, "big")),
            veth=f"{VETH_PREFIX}{index}",
        )


def reserve_index(kernel_id: str) -> int:
    """Reserve the lowest free /30 for ``kernel_id`` and return its index.

    A reservation is a file ``net/<index>`` created with O_EXCL, so concurrent
    launches, even from different servers, never get the same addresses.

    Raises:
        SandboxError: every /30 of the subnet is taken.
    """
    paths.net_dir().mkdir(parents=True, exist_ok=True)
    count = kernel_subnet().num_addresses // 4
    for index in range(1, count):
        try:
            fd = os.open(paths.net_dir() / str(index), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            continue
        with os.fdopen(fd, "w") as handle:
            handle.write(kernel_id)
        return index
    raise SandboxError(
        f"no free addresses left in {kernel_subnet()}; "
        "run `sandbox-kernel gc` or set SANDBOX_KERNEL_SUBNET to a larger block"
    )


def release_index(index: int) -> None:
    """Give the /30 number ``index`` back."""
    (paths.net_dir() / str(index)).unlink(missing_ok=True)


def reservations() -> dict[int, str]:
    """Every reserved index and the kernel id that holds it."""
    found: dict[int, str] = {}
    if paths.net_dir().is_dir():
        for entry in paths.net_dir().iterdir():
            if entry.name.isdigit():
                found[int(entry.name)] = entry.read_text().strip()
    return found


def netns_path(name: str) -> Path:
    """Where ``ip netns`` keeps the namespace ``name``."""
    return NETNS_DIR / name


async def create(netns: str, addr: Addresses, egress: bool) -> None:
    """Make the namespace ``netns`` with loopback and ``eth0``, joined to the host by a veth.

    Raises:
        CommandError: ``ip`` failed; nothing is left half-made.
    """
    ip = paths.ip_binary()
    await ensure_firewall()
    await run([ip, "netns", "add", netns])
    try:
        await run(
            [ip, "-batch", "-"],
            stdin=(
                f"link add {addr.veth} type veth peer name eth0 address {addr.mac} netns {netns}\n"
                f"addr add {addr.host_ip}/30 dev {addr.veth}\n"
                f"link set {addr.veth} up\n"
            ),
        )
        inside = f"link set lo up\naddr add {addr.kernel_ip}/30 dev eth0\nlink set eth0 up\n"
        if egress:
            inside += f"route add default via {addr.host_ip}\n"
        await run([ip, "-n", netns, "-batch", "-"], stdin=inside)
    except BaseException:
        await destroy(netns, addr, egress=False)
        raise
    if egress:
        await allow_egress(addr.veth)


async def destroy(netns: str, addr: Addresses, egress: bool) -> None:
    """Remove the namespace and both ends of its veth; what is already gone is fine."""
    await delete_veth(addr.veth)
    await delete_netns(netns)
    if egress:
        await forbid_egress(addr.veth)


async def delete_veth(veth: str) -> None:
    """Delete a host-side veth (its peer goes with it); one that is gone is fine."""
    await run([paths.ip_binary(), "link", "del", veth], check=False)


async def delete_netns(netns: str) -> None:
    """Delete a network namespace; one that is gone is fine."""
    await run([paths.ip_binary(), "netns", "del", netns], check=False)


def exists(netns: str) -> bool:
    """Whether the namespace ``netns`` exists."""
    return netns_path(netns).exists()


def leftover_namespaces() -> list[str]:
    """Names of namespaces made by the runtime (``sk-`` prefix)."""
    if not NETNS_DIR.is_dir():
        return []
    return sorted(p.name for p in NETNS_DIR.iterdir() if p.name.startswith(paths.PREFIX))


def leftover_veths() -> list[str]:
    """Names of host-side veths made by the runtime."""
    return sorted(
        p.name for p in Path("/sys/class/net").iterdir() if p.name.startswith(VETH_PREFIX)
    )


def firewall_rules() -> str:
    """The nftables table that keeps kernels apart. Pure text; see :func:`ensure_firewall`.

    - input: a kernel may only answer connections the host opened (the ZMQ ports);
      it reaches no host service.
    - forward: no kernel reaches another kernel, nothing outside opens a connection
      into a kernel, no kernel reaches link-local metadata services, and only the
      veths in the ``egress`` set may go out.
    - postrouting: NAT for egress kernels.
    """
    subnet = kernel_subnet()
    v = f'"{VETH_PREFIX}*"'
    return f"""
table inet {TABLE} {{
  set egress {{ type ifname; }}
  chain input {{
    type filter hook input priority -10; policy accept;
    iifname {v} ct state established,related accept
    iifname {v} drop
  }}
  chain forward {{
    type filter hook forward priority -10; policy accept;
    iifname {v} oifname {v} drop
    oifname {v} ct state established,related accept
    oifname {v} drop
    iifname {v} ip daddr 169.254.0.0/16 drop
    iifname @egress accept
    iifname {v} drop
  }}
  chain postrouting {{
    type nat hook postrouting priority 100; policy accept;
    ip saddr {subnet} oifname != {v} masquerade
  }}
}}
"""


async def ensure_firewall() -> None:
    """Install the table of :func:`firewall_rules` unless it is already there.

    Raises:
        CommandError: nft failed (no nf_tables support, or nft missing).
    """
    nft = paths.nft_binary()
    code, _, _ = await run([nft, "list", "table", "inet", TABLE], check=False)
    if code != 0:
        await run([nft, "-f", "-"], stdin=firewall_rules(), hint="is nf_tables available?")


async def allow_egress(veth: str) -> None:
    """Let ``veth``'s kernel reach the outside through NAT; turns on IPv4 forwarding."""
    await run([paths.nft_binary(), "add", "element", "inet", TABLE, "egress", f"{{ {veth} }}"])
    forward = Path("/proc/sys/net/ipv4/ip_forward")
    if forward.read_text().strip() != "1":
        forward.write_text("1\n")


async def forbid_egress(veth: str) -> None:
    """Take ``veth`` out of the egress set; a veth not in it is fine."""
    await run(
        [paths.nft_binary(), "delete", "element", "inet", TABLE, "egress", f"{{ {veth} }}"],
        check=False,
    )
