"""A rank > 0 of a data-parallel run: ``python -m mta_lab.train.ddp_rank``, started by rank 0
(:class:`mta_lab.train.ddp.RankLauncher`) with the run in its environment. Exit code 0: trained to the
end with rank 0; 1: failed (the traceback is on stderr, which is rank 0's)."""

from __future__ import annotations

import signal
import sys
import traceback


def main() -> int:
    from mta_lab.train.ddp import SharedRun, check_parent

    run = SharedRun.from_env()
    check_parent(run)
    # Rank 0 decides when the run stops, and stops this process: a terminal's Ctrl-C reaches every rank.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        from mta_lab.train.run import join_run

        join_run(run)
    except BaseException:  # an error, or stopped (rank 0 kills it first, as a rule)
        traceback.print_exc()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
