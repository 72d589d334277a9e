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

With an address, :func:`init_ray` joins that cluster (one-line error when nobody answers there);
a cluster on this machine's loopback (another serialgen process's) is joined from the loopback
address too (else Ray looks for this node's raylet at the routable address and waits forever).
Either way the caller's SIGTERM handler survives (``ray.init`` installs ``sys.exit`` in its place).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import signal
import socket
import threading

from serialgen.errors import SerialgenError

__all__ = ["LOOPBACK_SWITCH", "init_ray", "check_reachable"]

# Ray's switch: "0" makes a node take the loopback address as its IP (and bind its servers there).
LOOPBACK_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


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
    does not pick up an existing token by itself (``address="auto"`` does), and then retries for
    minutes. With a token at hand (``~/.ray/auth_token``, ``RAY_AUTH_TOKEN``) and no explicit
    ``RAY_AUTH_MODE``, turn token mode on the way Ray does for ``auto``: the environment variable
    alone is not enough once ``ray`` is imported (its configuration is read then; Ray's helper
    refreshes it). A cluster without authentication accepts a token too (checked with Ray 2.60)."""
    if address == "auto":
        return
    from ray._private.authentication.authentication_token_setup import maybe_enable_token_auth_if_token_available

    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


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
            # A cluster on this machine's loopback (another serialgen process's): this driver must
            # be on 127.0.0.1 too, or Ray looks for its raylet at the routable address and waits.
            local = _is_loopback(address.rpartition(":")[0])
            try:
                with _loopback_node(ray) if local else contextlib.nullcontext():
                    ray.init(address=address, **kwargs)
            except ConnectionError as exc:
                raise SerialgenError(f"--address {address}: cannot connect to the Ray cluster ({exc}); is it "
                                     "running (`ray status`), and is its auth token here (~/.ray/auth_token "
                                     "or RAY_AUTH_TOKEN)?") from None
            return False
        with _loopback_node(ray):
            ray.init(**kwargs)
        return True


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


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


@contextlib.contextmanager
def _loopback_node(ray):
    """While Ray starts or joins: this node's IP is the loopback address (Ray binds its servers
    there), for this process and the processes ``ray.init`` spawns; restored afterwards."""
    from ray._private import ray_constants  # Ray reads the switch from here in this process

    saved_env, saved_flag = os.environ.get(LOOPBACK_SWITCH), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[LOOPBACK_SWITCH] = "0"  # the processes ray.init spawns read it from their environment
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        if saved_env is None:
            os.environ.pop(LOOPBACK_SWITCH, None)
        else:
            os.environ[LOOPBACK_SWITCH] = saved_env
