"""Fault injection for the farm's tests: a character record that crashes, hangs or slows its worker.

A record may carry ``"fault": "<kind>[:<arg>]"``; it is honoured **only** when the worker process has
``SERIALGEN_FAULT_INJECTION=1`` in its environment (the tests set it for the driver; a local Ray
cluster passes the driver's environment to its workers), so a production manifest cannot trigger it.
The fault fires inside the real Blender worker, after a sample was appended to the shard's temporary
file, i.e. mid-job with a half-written shard on disk:

* ``crash``: ``os.kill(own pid, SIGKILL)`` after the first sample (what a Blender segfault looks like
  to Ray: the process vanishes without a word);
* ``hang``: sleep forever after the first sample (a stuck GL driver; the driver's job timeout must
  kill it);
* ``error``: raise ``RuntimeError`` after the first sample (a Python failure of the whole job);
* ``slow:S``: sleep S seconds after every sample (a long job, so a test can SIGKILL it mid-job).
"""

from __future__ import annotations

import os
import signal
import time

__all__ = ["ENV", "fault_of", "inject"]

ENV = "SERIALGEN_FAULT_INJECTION"


def fault_of(record: dict) -> tuple[str, str] | None:
    """(kind, argument) of the record's fault, or None (no fault, or injection not enabled)."""
    fault = record.get("fault")
    if not fault or os.environ.get(ENV) != "1":
        return None
    kind, _, arg = str(fault).partition(":")
    return kind, arg


def inject(record: dict, written: int) -> None:
    """Called after sample number ``written`` (1-based) of a job of ``record`` reached the shard."""
    fault = fault_of(record)
    if fault is None:
        return
    kind, arg = fault
    if kind == "slow":
        time.sleep(float(arg or 1.0))
    elif written != 1:
        return
    elif kind == "crash":
        os.kill(os.getpid(), signal.SIGKILL)
    elif kind == "hang":
        while True:
            time.sleep(3600)
    elif kind == "error":
        raise RuntimeError(f"injected fault of character {record.get('id')!r}")
    else:
        raise ValueError(f"character {record.get('id')!r}: unknown fault {kind!r}")
