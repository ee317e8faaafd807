"""Where a kernel and the daemon listen: constants, in a module light to import
(a kernel's job on its node needs them before anything else)."""

#: The ports a kernel listens on inside its container (each has its own address).
KERNEL_PORTS = {"shell_port": 50001, "iopub_port": 50002, "stdin_port": 50003,
                "control_port": 50004, "hb_port": 50005}  # fmt: skip
#: The daemon's socket, unless its configuration says otherwise.
DEFAULT_SOCKET = "/run/sandbox-kernel/daemon.sock"
