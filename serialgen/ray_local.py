"""Ray for serialgen's commands: a local cluster that listens on loopback only, or a cluster to join.

Ray 2.60 started by a bare ``ray.init()`` on Linux listens on every interface: the GCS, the raylet
(node manager and object manager) and every worker's gRPC server bind ``*:<port>``, so anyone on
the network can reach a cluster that runs arbitrary code. Ray binds its servers to loopback when
the node's IP is the loopback address, which it only picks by itself where it thinks clusters are
unsupported (macOS, Windows: ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER``). ``ray.init(_node_ip_address=
"127.0.0.1")`` does not help: Ray replaces a loopback address by the machine's routable one. So
:func:`init_ray` without an address starts the local cluster with that switch off for the start
(this process and the processes it spawns: GCS, raylet, agents, workers), then restores it, so a
later join of a real cluster from this process is unaffected. ``tests/test_render_farm.py``
checks the listening sockets of every process of such a cluster with psutil.

With an address, :func:`init_ray` joins that cluster (one-line error when nobody answers there).
Either way the caller's SIGTERM handler survives (``ray.init`` installs ``sys.exit`` in its place).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
from pathlib import Path

from serialgen.errors import SerialgenError

__all__ = ["LOOPBACK_SWITCH", "init_ray", "check_reachable"]

# Ray's switch: "0" makes a node take the loopback address as its IP (and bind its servers there).
LOOPBACK_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
_AUTH_MODE = "RAY_AUTH_MODE"


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """One-line error for a ``host:port`` nobody listens on: ``ray.init`` would retry it for many
    minutes, deaf to Ctrl-C. Other forms ("auto", "ray://...") are left to Ray."""
    host, sep, port = address.rpartition(":")
    if not sep or "://" in address or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        raise SerialgenError(f"--address {address}: no Ray cluster answers there ({exc.strerror or exc}); "
                             "start one with `ray start --head` or give the head's host:port") from None


def _token_auth_for(address: str) -> None:
    """Ray 2.60 clusters use token authentication by default, but ``ray.init(address=host:port)``
    does not pick up an existing token by itself (``address="auto"`` does), and then times out.
    With a token at hand and no explicit ``RAY_AUTH_MODE``, ask for token mode (a cluster without
    authentication accepts it too; checked with Ray 2.60)."""
    if os.environ.get(_AUTH_MODE) is not None or address == "auto":
        return
    token_file = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
    if os.environ.get("RAY_AUTH_TOKEN") or token_file.is_file():
        os.environ[_AUTH_MODE] = "token"


def init_ray(address: str | None = None, **kwargs) -> bool:
    """Connect this process to Ray; returns True when it started a local cluster (the caller then
    calls ``ray.shutdown()`` when done), False when it joined one or Ray was already initialised.

    ``address`` None: a new local cluster bound to 127.0.0.1 (GCS, raylet, agents, workers; Ray's
    token authentication stays as Ray sets it up). Otherwise join the cluster at ``address``.
    ``kwargs`` go to ``ray.init`` (``num_cpus``, ``log_to_driver``, ...); the dashboard is off
    unless asked for.
    """
    import ray

    if ray.is_initialized():
        return False
    kwargs.setdefault("include_dashboard", False)
    with _own_sigterm():
        if address:
            check_reachable(address)
            _token_auth_for(address)
            try:
                ray.init(address=address, **kwargs)
            except ConnectionError as exc:
                raise SerialgenError(f"--address {address}: cannot connect to the Ray cluster ({exc}); is it "
                                     "running (`ray status`), and is its auth token here (~/.ray/auth_token "
                                     "or RAY_AUTH_TOKEN)?") from None
            return False
        return _start_local(ray, kwargs)


@contextlib.contextmanager
def _own_sigterm():
    """``ray.init`` replaces the process's SIGTERM handler with ``sys.exit``: put the caller's back
    (the render farm stops on SIGTERM as on Ctrl-C: whole shards kept, the report written)."""
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main else None
    try:
        yield
    finally:
        if main and previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _start_local(ray, kwargs: dict) -> bool:
    from ray._private import ray_constants  # Ray reads the switch from here in this process

    saved_env, saved_flag = os.environ.get(LOOPBACK_SWITCH), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[LOOPBACK_SWITCH] = "0"  # the processes ray.init spawns read it from their environment
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        ray.init(**kwargs)
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        if saved_env is None:
            os.environ.pop(LOOPBACK_SWITCH, None)
        else:
            os.environ[LOOPBACK_SWITCH] = saved_env
    return True
