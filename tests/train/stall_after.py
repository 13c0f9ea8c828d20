"""`python stall_after.py N ARGS` is `python -m yunque ARGS` in which each process, once it has saved a checkpoint
past step N, makes no more progress (it sleeps until it is killed). tests/train/test_distributed.py kills such a
job: the kill lands mid-run, after that checkpoint's commit, however loaded the machine is (a job left running
while the test looked for its checkpoint could finish, or be killed in the middle of a later commit)."""

import sys
import time

from yunque.cli import main
from yunque.train.distributed import DistributedRuntime
from yunque.train.runtime import Runtime

AFTER = int(sys.argv[1])


def stalling(save):
    def save_then_stall(self, out, model, optimizer, step, extra, *, trainable_only):
        save(self, out, model, optimizer, step, extra, trainable_only=trainable_only)
        while step > AFTER:
            time.sleep(1)

    return save_then_stall


Runtime.save_checkpoint = stalling(Runtime.save_checkpoint)
DistributedRuntime.save_checkpoint = stalling(DistributedRuntime.save_checkpoint)
sys.exit(main(sys.argv[2:]))
