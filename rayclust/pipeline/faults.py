"""A testing hook that kills the driver at a point the code names, so the failure tests do not
depend on the machine's speed (issue 11): a test that polls the run directory and kills from the
outside needs a model slow enough for the kill to land mid-stage, and still races it.

No-op unless RAYCLUST_FAULT_KILL_DRIVER is set. (Ray Train workers have their own hook,
`train_runtime.fault_point`, which waits for a registered checkpoint.)
"""

from __future__ import annotations

import os
import signal

DRIVER_FAULT_ENV = "RAYCLUST_FAULT_KILL_DRIVER"


def driver_fault_point(stage: str, count: int) -> None:
    """With RAYCLUST_FAULT_KILL_DRIVER="<stage>:<count>" (e.g. "embed:1"), SIGKILL this process
    once `stage` reports at least `count` (for embed: shards this process has written), as a lost
    driver or machine would: no cleanup, no atexit, the Ray job's workers torn down by Ray."""
    fault = os.environ.get(DRIVER_FAULT_ENV)
    if not fault:
        return
    at_stage, _, at_count = fault.partition(":")
    if at_stage == stage and count >= int(at_count):
        os.kill(os.getpid(), signal.SIGKILL)
