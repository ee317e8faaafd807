"""A JupyterHub whose users' kernels run sandboxed through the sandbox-kernel daemon.

Used by `make hub` (for a person to try) and by tests/integration/test_hub.py. The
hub runs as root, as the LocalProcessSpawner needs; each user's single-user server
runs as that user (not root) and starts "Python 3 (sandbox)" kernels through the
daemon. Any listed user logs in with the password below (DummyAuthenticator: for
trying this out, never for a real server).

Settings from the environment (defaults in brackets):
    SK_HUB_USERS     comma-separated local users allowed in [sk-demo-1,sk-demo-2,sk-demo-3]
    SK_HUB_DIR       the hub's database, cookie secret and logs [build/hub]
    SK_HUB_PORT      the proxy's public port [8000]
    SK_HUB_API_PORT  the proxy's API port [8001]
    SK_HUB_HUB_PORT  the hub's own port [8081]
    SK_HUB_TOKEN     if set, a service token with the right to start and use servers
    SANDBOX_KERNEL_SOCKET  the daemon's socket [/run/sandbox-kernel/daemon.sock]
"""

import os
from pathlib import Path

c = get_config()  # type: ignore[name-defined]  # noqa: F821 (JupyterHub's config loader)

REPO = Path(__file__).resolve().parents[1]
VENV = REPO / "build/hub-venv"
STATE = Path(os.environ.get("SK_HUB_DIR", REPO / "build/hub"))
STATE.mkdir(parents=True, exist_ok=True)
USERS = [u for u in os.environ.get("SK_HUB_USERS", "sk-demo-1,sk-demo-2,sk-demo-3").split(",") if u]

c.JupyterHub.ip = "127.0.0.1"
c.JupyterHub.port = int(os.environ.get("SK_HUB_PORT", "8000"))
c.JupyterHub.hub_ip = "127.0.0.1"
c.JupyterHub.hub_port = int(os.environ.get("SK_HUB_HUB_PORT", "8081"))
c.ConfigurableHTTPProxy.api_url = f"http://127.0.0.1:{os.environ.get('SK_HUB_API_PORT', '8001')}"
c.ConfigurableHTTPProxy.command = [
    str(REPO / "build/hub-node/node_modules/.bin/configurable-http-proxy")
]
c.JupyterHub.db_url = f"sqlite:///{STATE / 'jupyterhub.sqlite'}"
c.JupyterHub.cookie_secret_file = str(STATE / "cookie_secret")
c.JupyterHub.pid_file = str(STATE / "jupyterhub.pid")
c.ConfigurableHTTPProxy.pid_file = str(STATE / "proxy.pid")

c.JupyterHub.authenticator_class = "dummy"
c.DummyAuthenticator.password = "sandbox"
c.Authenticator.allowed_users = set(USERS)

c.JupyterHub.spawner_class = "localprocess"
c.Spawner.cmd = [str(VENV / "bin/jupyterhub-singleuser")]
c.Spawner.default_url = "/lab"
c.Spawner.notebook_dir = "~"
c.Spawner.start_timeout = 60
c.Spawner.http_timeout = 60
c.Spawner.environment = {
    "SANDBOX_KERNEL_SOCKET": os.environ.get(
        "SANDBOX_KERNEL_SOCKET", "/run/sandbox-kernel/daemon.sock"
    ),
}

token = os.environ.get("SK_HUB_TOKEN")
if token:
    c.JupyterHub.services = [{"name": "sandbox-kernel-test", "api_token": token}]
    c.JupyterHub.load_roles = [
        {
            "name": "sandbox-kernel-test",
            "scopes": ["admin:users", "admin:servers", "access:servers", "read:users"],
            "services": ["sandbox-kernel-test"],
        }
    ]
