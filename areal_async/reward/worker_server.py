"""The reward workers' clean entry point: ``python -m areal_async.reward.worker_server CONTROL_FD LIMIT_MB``.

The parent (`SandboxPool`) starts this module in a fresh interpreter, so no worker ever imports the caller's
main module or whatever it has loaded (torch maps gigabytes of address space, which would leave nothing under
the cap). The server imports the verifier once, then forks one worker per request: a request is one byte with
the worker's end of a socket pair attached (SCM_RIGHTS); the server answers with the new worker's pid (8 bytes,
little-endian). Workers cap their own address space after the fork. The server exits when the parent closes the
control socket or dies.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from multiprocessing.connection import Connection


def serve(control: socket.socket, memory_limit_mb: int) -> None:
    from areal_async.reward import sandbox  # sympy and the parser, imported once for every fork

    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps exited workers: no zombies
    while True:
        try:
            message, fds, _, _ = socket.recv_fds(control, 1, 1)
        except OSError:
            return
        if not message:  # the parent closed the control socket or died
            return
        (fd,) = fds
        pid = os.fork()
        if pid == 0:
            control.close()
            try:
                sandbox.worker_main(Connection(fd), memory_limit_mb)
            finally:
                os._exit(0)
        os.close(fd)
        control.sendall(pid.to_bytes(8, "little"))


def main(argv: list[str]) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the parent to handle
    control_fd, memory_limit_mb = int(argv[0]), int(argv[1])
    serve(socket.socket(fileno=control_fd), memory_limit_mb)


if __name__ == "__main__":
    main(sys.argv[1:])
