"""torchrun as `soda train --nproc N`, launch/torchrun.sh and the SLURM script start it: ending on one line.

A rank that stops on a user's mistake has already printed that mistake in one line; stock torchrun
then adds a 30-line ChildFailedError traceback and a table per rank, which buries it, and a
preemption signal (forwarded to the ranks, which save and stop) ends in a SignalException traceback
in every job log. This is torchrun itself (its argument parser, launcher, signal forwarding and
environment variables), with only those endings replaced by one line each.
"""

from __future__ import annotations

import logging
import signal
import sys

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import parse_args, run


def exit_line(error: ChildFailedError) -> tuple[str, int]:
    """The line to print and the exit code to return for a failed launch."""
    rank, failure = error.get_first_failure()
    code = failure.exitcode
    if code < 0:
        how = f"was killed by {signal.Signals(-code).name}" if -code in signal.valid_signals() else f"exited {code}"
        return f"soda train: rank {rank} {how}", 128 - code
    return f"soda train: rank {rank} exited with code {code} (its message is above)", code or 1


def main(argv: list[str] | None = None) -> int:
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").setLevel(logging.CRITICAL)
    try:
        run(parse_args(argv))
    except ChildFailedError as e:
        line, code = exit_line(e)
        print(line, file=sys.stderr)
        return code
    except SignalException as e:  # the ranks got the signal too and have had their time to save
        print(f"soda train: torchrun stopped on {signal.Signals(e.sigval).name}", file=sys.stderr)
        return 128 + e.sigval
    return 0


if __name__ == "__main__":
    sys.exit(main())
