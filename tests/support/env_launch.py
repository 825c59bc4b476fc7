#!/usr/bin/env python
"""The tests' default launcher: N ranks of a script, each a process of its own told RANK, LOCAL_RANK,
WORLD_SIZE, MASTER_ADDR and MASTER_PORT, as srun starts them (rm-train reads these, whoever sets them). It
imports nothing heavy: torchrun imports torch before it starts a rank, and the deepspeed launcher imports
deepspeed in two processes, seconds of every launch; the tests that name those launchers keep them covered.

    python tests/support/env_launch.py N PORT SCRIPT [ARGS...]

Exits with the first failing rank's status, after stopping the other ranks (SIGTERM, then SIGKILL), or 0.
"""

import os
import signal
import subprocess
import sys
import time


def main() -> int:
    n, port, cmd = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
    env = dict(os.environ, WORLD_SIZE=str(n), LOCAL_WORLD_SIZE=str(n), MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    ranks = [subprocess.Popen([sys.executable, *cmd], env=env | {"RANK": str(r), "LOCAL_RANK": str(r)})
             for r in range(n)]
    failed = 0
    while any(p.poll() is None for p in ranks) and not failed:
        failed = next((p.returncode for p in ranks if p.returncode not in (None, 0)), 0)
        time.sleep(0.05)
    failed = failed or next((p.returncode for p in ranks if p.returncode), 0)
    if failed:
        for p in ranks:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.time() + 30
        for p in ranks:
            try:
                p.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                p.kill()
    return failed


if __name__ == "__main__":
    sys.exit(main())
