"""A torchrun worker that counts the SIGTERMs it gets (no torch import: starts in ~0.1 s).

    count_signals.py DIR

Writes ``DIR/ready-<pid>`` once its handler is in place; after the first SIGTERM it waits
one more second for any further ones, writes the count to ``DIR/count-<RANK>``, leaves the
exit note spotrun.distributed's wrapper reads (``$SPOTRUN_EXIT_NOTES/<pid>``, as
``spotrun.distributed.note_exit`` does after a committed stop checkpoint) and exits 75.
"""

from __future__ import annotations

import os
import signal
import sys
import time

folder = sys.argv[1]
count = 0


def on_term(signum: int, frame: object) -> None:
    global count
    count += 1


signal.signal(signal.SIGTERM, on_term)
open(os.path.join(folder, f"ready-{os.getpid()}"), "w").close()
while not count:
    time.sleep(0.02)
time.sleep(1.0)  # a second SIGTERM, if one comes, comes within this
with open(os.path.join(folder, f"count-{os.environ['RANK']}"), "w") as f:
    f.write(str(count))
with open(os.path.join(os.environ["SPOTRUN_EXIT_NOTES"], str(os.getpid())), "w") as f:
    f.write("75")
os._exit(75)
