"""One process of a multi-process job: ``python -m stylekit.remote.ranks <payload file> <result file>``.

Started by ``worker.run_ranks`` under ``accelerate launch`` (GPUs) or torch's launcher (CPUs, gloo). Every rank
runs the same Hydra job in the same run dir; the task's Accelerator joins them into one DDP group. Rank 0
writes ``.hydra/``, the log and the result; the other ranks only compute.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from hydra.core.utils import JobStatus

from stylekit.remote.worker import dumps, loads, quiet_rank_config, run


def main(argv: list[str]) -> int:
    payload_file, result_file = argv
    payload = loads(Path(payload_file).read_bytes())
    rank = int(os.environ.get("RANK", "0"))
    if rank != 0:
        payload.config = quiet_rank_config(payload.config)
    result = run(payload)
    if rank == 0:
        partial = Path(result_file + ".part")
        partial.write_bytes(dumps(result))
        partial.replace(result_file)
    if result.status == JobStatus.FAILED:
        print(f"rank {rank}: {result.error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
