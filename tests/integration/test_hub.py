"""A real JupyterHub, end to end: three users' single-user servers run as those
users (not root), start "Python 3 (sandbox)" kernels through the daemon, snapshot
and restore over the kernels' websockets, and cannot see one another."""

from __future__ import annotations

import os
from pathlib import Path

from sandbox_kernel.runtime import Runtime, snapshots

from .hub import Hub, KernelSession

KERNELSPEC = "python3-sandbox"


def _servers() -> dict[int, int]:
    """pid -> uid of every single-user server on the machine."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
            uid = os.stat(proc).st_uid
        except OSError:
            continue
        if b"jupyterhub-singleuser" in cmdline:
            found[int(proc.name)] = uid
    return found


async def test_three_users_on_a_real_hub(hub: Hub) -> None:
    for user in hub.users:
        await hub.start_server(user)
    uids = {u.uid for u in hub.users}
    servers = _servers()
    assert servers and set(servers.values()) <= uids, servers  # none is root's
    sessions = [await KernelSession.open(hub, user, KERNELSPEC) for user in hub.users]
    try:
        for session in sessions:
            out, err = await session.execute("import os; print(os.getuid(), os.getcwd())")
            assert not err, err
            assert out == f"{session.user.uid} {session.user.home}\n"
            record = Runtime().record(session.kernel_id)
            assert record.belongs_to == session.user.uid
        alice, bob, _ = sessions
        out, err = await alice.execute(
            "secret = 'alice only'\nopen('mine.txt', 'w').write('a')\n%container snapshot s1"
        )
        assert not err and "Snapshot s1" in out, (out, err)
        await alice.execute("secret = 'changed'")
        out, err = await alice.execute("%container restore s1")
        assert not err, err
        out, err = await alice.execute("print(secret)")
        assert (out, err) == ("alice only\n", "")
        # Bob sees neither Alice's snapshot nor her files, in his kernel or the store.
        out, err = await bob.execute("%container list")
        assert "s1" not in out
        out, err = await bob.execute("%container restore s1")
        assert err or "no snapshot" in out.lower(), (out, err)
        out, err = await bob.execute(
            f"import os; print(os.path.exists({str(alice.user.home / 'mine.txt')!r}))"
        )
        assert out == "False\n", (out, err)
        assert "s1" in snapshots.names(str(alice.user.uid))
        bob_owner = str(bob.user.uid)
        assert bob_owner not in snapshots.owners() or "s1" not in snapshots.names(bob_owner)
    finally:
        for session in sessions:
            await session.close()
