"""A local Ray cluster of serialgen listens on loopback only (issue 12, item 10).

Ray 2.60's bare ``ray.init()`` on Linux binds its GCS, raylet and worker servers to every interface;
``serialgen.ray_local.init_ray`` starts the cluster with the node on 127.0.0.1. Checked on the
listening sockets (psutil) of every process of the cluster: the driver, GCS, raylet, agents and
worker processes (the render farm's Blender actors included).
"""

from __future__ import annotations

import ipaddress
import os

import psutil
import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _listening(pids) -> dict[int, list[str]]:
    """{pid: [listening address, ...]} of the given processes (IPv4 and IPv6)."""
    out = {}
    for pid in pids:
        try:
            conns = psutil.Process(pid).net_connections(kind="inet")
        except psutil.NoSuchProcess:
            continue
        out[pid] = [c.laddr.ip for c in conns if c.status == psutil.CONN_LISTEN]
    return out


def _is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip)
    mapped = getattr(addr, "ipv4_mapped", None)  # "::ffff:127.0.0.1": IPv4 loopback on a v6 socket
    return (mapped or addr).is_loopback


def _cluster_pids() -> list[int]:
    me = psutil.Process()
    return [me.pid] + [p.pid for p in me.children(recursive=True)]


def _assert_loopback_only(what: str) -> int:
    listening = _listening(_cluster_pids())
    sockets = [(pid, ip) for pid, ips in listening.items() for ip in ips]
    assert len(sockets) >= 4, f"{what}: expected the GCS, raylet and worker servers to listen, got {listening}"
    outside = [(psutil.Process(pid).name(), ip) for pid, ip in sockets if not _is_loopback(ip)]
    assert not outside, f"{what}: listening beyond loopback: {outside}"
    return len(sockets)


def test_init_ray_binds_every_server_of_a_local_cluster_to_loopback():
    import ray

    from serialgen.ray_local import LOOPBACK_SWITCH, init_ray

    assert not ray.is_initialized()
    before = os.environ.get(LOOPBACK_SWITCH)

    @ray.remote(num_cpus=1)
    class Probe:
        def pid(self) -> int:
            return os.getpid()

    import signal

    def ours(signum, frame):  # the caller's SIGTERM handler (the render farm's: stop like Ctrl-C)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, ours)
    try:
        assert init_ray(None, num_cpus=2, log_to_driver=False) is True
        assert signal.getsignal(signal.SIGTERM) is ours  # ray.init installs sys.exit; init_ray puts it back
        actors = [Probe.remote() for _ in range(2)]
        worker_pids = ray.get([a.pid.remote() for a in actors])
        assert ray.get_runtime_context().gcs_address.startswith("127.0.0.1:")
        _assert_loopback_only("init_ray")
        # the workers themselves (their own gRPC servers), not only the control plane
        assert all(_listening([pid])[pid] for pid in worker_pids)
        assert init_ray(None) is False  # already connected: nothing started twice
    finally:
        ray.shutdown()
        signal.signal(signal.SIGTERM, previous)
    assert os.environ.get(LOOPBACK_SWITCH) == before  # a later join from this process is unaffected


def test_the_render_farm_pool_starts_its_cluster_on_loopback(tmp_path):
    """The farm's RayPool goes through init_ray: its Blender actors listen on loopback only."""
    import ray

    from serialgen.render.farm.pool import RayPool
    from serialgen.render.scene import RenderSettings

    pool = RayPool(RenderSettings(width=64, height=96), 1, 1, 0, 1, 50, 6000.0, False, log_dir=str(tmp_path / "logs"))
    try:
        actor = pool.actor_cls.remote(pool.settings, "w0.1", *pool.actor_args)
        pid = ray.get(actor.pid.remote())
        assert _listening([pid])[pid]  # the Blender worker's own server
        _assert_loopback_only("RayPool")
    finally:
        ray.shutdown()
        pool._ray_logging.restore()


def test_init_ray_joins_a_loopback_cluster_of_another_process_with_its_token():
    """Another serialgen process's local cluster (loopback, token authentication): a fresh process
    joins it with --address. Before: Ray looked for the joiner's raylet at the routable address and
    waited forever, and a token set up after `import ray` was not used (minutes of retries)."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}
    owner = subprocess.Popen(
        [sys.executable, "-c", "import sys, ray; from serialgen.ray_local import init_ray; init_ray(None, num_cpus=1); "
                               "print(ray.get_runtime_context().gcs_address, flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        address = owner.stdout.readline().strip()
        assert address.startswith("127.0.0.1:"), address
        joiner = subprocess.run(
            [sys.executable, "-c", "import sys, ray; from serialgen.ray_local import init_ray; "
                                   f"started = init_ray({address!r}, log_to_driver=False); "
                                   "f = ray.remote(lambda: 42); print(started, ray.get(f.remote()))"],
            capture_output=True, text=True, timeout=90, env=env)
        assert joiner.returncode == 0, joiner.stderr[-2000:]
        assert joiner.stdout.split() == ["False", "42"]  # joined, not started; ran a task there
    finally:
        owner.stdin.close()
        owner.wait(timeout=60)
