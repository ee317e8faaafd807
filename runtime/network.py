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
import re
from dataclasses import dataclass
from pathlib import Path

from sandbox_kernel.errors import ConfigError, SandboxError

from . import paths
from .process import run

NETWORK_MODES = ("none", "egress")
NETNS_DIR = Path("/var/run/netns")
TABLE = "sandbox_kernel"
#: Marks the table's rules; a table with another mark is replaced.
FIREWALL_VERSION = "sandbox-kernel firewall 3"
#: The port of each kernel's control server, on the host end of its veth.
CONTROL_PORT = 50100
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
    paths.net_dir().mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(paths.net_dir(), 0o700)  # which kernel has which address is root's to know
    count = kernel_subnet().num_addresses // 4
    for index in range(1, count):
        try:
            fd = os.open(paths.net_dir() / str(index), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
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


async def remove_stale_veth(addr: Addresses) -> None:
    """Remove a host end of ``addr``'s veth that is still there, before a kernel's
    namespace is joined to the host at that address: a crash may have left one, and
    the kernel frees a dead namespace's devices a little after its last process
    ends. The new pair needs the name; an old one is never reused."""
    if configured(addr):
        await delete_veth(addr.veth)


def configured(addr: Addresses) -> bool:
    """Whether the host end of kernel ``addr.index``'s veth exists."""
    return Path(f"/sys/class/net/{addr.veth}").exists()


def _inside_commands(addr: Addresses, egress: bool, host: int) -> str:
    """``ip -batch`` lines, run in the kernel's namespace, that make the veth pair
    (``eth0`` here, ``addr.veth`` in the network namespace of process ``host``, this
    one) and address ``eth0``. The host end stays down (see :func:`attach`)."""
    lines = (
        f"link add eth0 address {addr.mac} type veth peer name {addr.veth} netns {host}\n"
        f"link set lo up\naddr add {addr.kernel_ip}/30 dev eth0\nlink set eth0 up\n"
    )
    if egress:
        lines += f"route add default via {addr.host_ip}\n"
    return lines


def _host_commands(addr: Addresses) -> str:
    """``ip -batch`` lines that address and raise the host end of the veth."""
    return f"addr add {addr.host_ip}/30 dev {addr.veth}\nlink set {addr.veth} up\n"


def _enter(pid: int | str) -> list[str]:
    """The command that runs ``ip`` in the network namespace of ``pid``."""
    return [paths.nsenter_binary(), f"--net=/proc/{pid}/ns/net", paths.ip_binary()]


async def attach(pid: int, addr: Addresses, egress: bool) -> None:
    """Join the network namespace of process ``pid`` (made by runc, owned by the
    kernel's user namespace) to the host: a veth pair, ``eth0`` inside and
    ``addr.veth`` outside, with the addresses and MAC of ``addr``.

    The pair lives as long as the namespace: when the kernel's last process ends,
    both ends go. The namespace's side is done before the kernel runs: started
    side by side with it, one kernel start in five took a second longer (a
    retransmission, measured with ``bench/startup.py``). The host's side, by
    :func:`attach_host`, runs while the kernel starts.

    Raises:
        CommandError: ``ip``, ``nsenter`` or ``nft`` failed; the veth is removed again.
    """
    try:
        await ensure_firewall()
        inside = _inside_commands(addr, egress, os.getpid())
        await run([*_enter(pid), "-batch", "-"], stdin=inside)
    except BaseException:
        await delete_veth(addr.veth)
        raise


async def attach_host(addr: Addresses, egress: bool) -> None:
    """Address and raise the host end of a veth made by :func:`attach`.

    Until then the host has no route to the kernel, so a client's connection fails
    at once and is tried again, instead of waiting a second for an ARP answer from
    an ``eth0`` that is not up yet.

    Raises:
        CommandError: ``ip`` or ``nft`` failed; the veth is removed.
    """
    try:
        await run([paths.ip_binary(), "-batch", "-"], stdin=_host_commands(addr))
        if egress:
            await allow_egress(addr.veth)
    except BaseException:
        await delete_veth(addr.veth)
        raise


#: The CRIU action that :func:`restore_script` acts on: everything is restored, and
#: no process runs yet.
RESTORE_ACTION = "post-restore"


def restore_script(addr: Addresses, egress: bool) -> str:
    """A CRIU action script that gives a restored kernel its network, as
    :func:`attach` does for a new one.

    runc checkpoints a network namespace it knows no interfaces of as an empty one:
    CRIU brings back the kernel's sockets, but its namespace comes back with a
    loopback device only. The script joins it to the host before the processes run
    again, so the kernel's first packet finds its way. The kernel's sockets listen
    on every address and its connections are closed on restore (``tcp-close``), so
    a base restored into another kernel takes that kernel's address as well.
    """
    # Both namespaces are named by a process in them: the restored init (CRIU
    # passes its pid), and this process for the host's.
    inside = " ".join(_enter('"$CRTOOLS_INIT_PID"'))
    host = " ".join(_enter(os.getpid()))
    return (
        "#!/bin/sh\n"
        "# Written by sandbox-kernel: the network of a restored kernel (network.py).\n"
        f'[ "$CRTOOLS_SCRIPT_ACTION" = {RESTORE_ACTION} ] || exit 0\n'
        "set -e\n"
        f"{inside} -batch - <<'EOF'\n{_inside_commands(addr, egress, os.getpid())}EOF\n"
        f"{host} -batch - <<'EOF'\n{_host_commands(addr)}EOF\n"
    )


async def destroy(addr: Addresses, egress: bool) -> None:
    """Remove both ends of a kernel's veth and its egress; what is gone is fine."""
    await delete_veth(addr.veth)
    if egress:
        await forbid_egress(addr.veth)


async def delete_veth(veth: str) -> None:
    """Delete a host-side veth (its peer goes with it); one that is gone is fine."""
    await run([paths.ip_binary(), "link", "del", veth], check=False)


async def delete_netns(netns: str) -> None:
    """Delete a network namespace; one that is gone is fine."""
    await run([paths.ip_binary(), "netns", "del", netns], check=False)


def leftover_namespaces() -> list[str]:
    """Names of namespaces named by the runtime (``sk-`` prefix): versions before
    the user namespace made each kernel's netns with ``ip netns add``."""
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

    - input: a kernel may only answer connections the host opened (the ZMQ ports)
      and open connections to its own control server (the control port on its own
      veth's host address), at most 16 at once; it reaches no other host service.
    - forward: no kernel reaches another kernel, nothing outside opens a connection
      into a kernel, no kernel reaches link-local metadata services, and only the
      veths in the ``egress`` set may go out.
    - postrouting: NAT for egress kernels.
    """
    subnet = kernel_subnet()
    v = f'"{VETH_PREFIX}*"'
    # Concurrent control connections per kernel address: twice the control server's
    # own cap (control.MAX_CONNECTIONS, 8), so that the server's cap is what
    # normally acts; this one keeps a flood off the host's accept queue.
    over_cap = "add @ctl_conns { ip saddr ct count over 16 }"
    return f"""
table inet {TABLE} {{
  comment "{FIREWALL_VERSION}"
  set egress {{ type ifname; }}
  set ctl_conns {{ type ipv4_addr; flags dynamic; size 65535; }}
  chain input {{
    type filter hook input priority -10; policy accept;
    iifname {v} ct state established,related accept
    iifname {v} tcp dport {CONTROL_PORT} ct state new {over_cap} reject with tcp reset
    iifname {v} tcp dport {CONTROL_PORT} fib daddr . iif type local accept
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


#: Set once this process has seen the firewall table in place: the check costs an
#: ``nft`` run, and the table, once made, stays until someone deletes it by hand.
_firewall_seen = False


async def ensure_firewall() -> None:
    """Install the table of :func:`firewall_rules` unless it is already there.

    Raises:
        CommandError: nft failed (no nf_tables support, or nft missing).
    """
    global _firewall_seen
    if _firewall_seen:
        return
    nft = paths.nft_binary()
    code, listed, _ = await run([nft, "list", "table", "inet", TABLE], check=False)
    if code != 0 or FIREWALL_VERSION not in listed:
        rules = firewall_rules()
        if code == 0:  # an older version: replace it, keeping the egress set
            rules = f"delete table inet {TABLE}\n{rules}"
            for veth in re.findall(rf"\b{VETH_PREFIX}\d+\b", listed.split("elements", 1)[-1]):
                rules += f"add element inet {TABLE} egress {{ {veth} }}\n"
        await run([nft, "-f", "-"], stdin=rules, hint="is nf_tables available?")
    _firewall_seen = True


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
