"""Run by tests/test_distributed.py under torchrun: ``attribute --dataset`` in which process 1 is killed with
SIGKILL (as by ``kill -9`` or the kernel's out-of-memory killer) at its second batch, after its first checkpoint
(``NEURONTRACE_CHECKPOINT_SECONDS=0``: one after every batch).

Usage: ``distributed_kill_one.py WHERE MARKER ARGS...``: the ``neurontrace`` arguments come after ``WHERE``
and the path ``MARKER`` of a file that process 1 writes just before it kills itself:

- ``WHERE=collective``: process 0 computes its share and waits for process 1 in the collective that merges the
  shares (the gloo collective then fails: the connection is closed by the dead peer). The test slows the
  launcher's polling (``--monitor-interval``) so that the launcher does not stop process 0 first.
- ``WHERE=loop``: process 0 is still in its batch loop, with no collective to fail, until the launcher stops it
  with SIGTERM.

Process 0 waits for ``MARKER`` at its second batch, so each case happens for sure.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import neurontrace.attribution.api as api
from neurontrace import distributed
from neurontrace.cli import main

where, dying, argv = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
calls = 0
Attributor = api.BatchAttributor


class Hooked(Attributor):
    def __call__(self, *args, **kwargs):
        global calls
        calls += 1
        rank = distributed.world().rank
        if rank == 1 and calls == 2:  # its first batch is checkpointed (NEURONTRACE_CHECKPOINT_SECONDS=0)
            dying.write_text("")
            os.kill(os.getpid(), signal.SIGKILL)
        if rank == 0 and calls == 2:
            while not dying.exists():
                time.sleep(0.01)
            if where == "loop":
                while True:  # still computing when the launcher's SIGTERM comes
                    time.sleep(0.01)
        return super().__call__(*args, **kwargs)


api.BatchAttributor = Hooked
sys.exit(main(argv))
