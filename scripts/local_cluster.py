"""Bring a multi-node Ray cluster up on this machine, on loopback only, and take it down again.

    python scripts/local_cluster.py up [--workers 2] [--worker-cpus 3] [--bucket dfc-runs]
    eval "$(python scripts/local_cluster.py env)"    # RAY_ADDRESS + the S3 endpoint for this shell
    ray job submit --working-dir . -- dfc-ray sweep cluster-smoke --storage s3://dfc-runs/runs
    python scripts/local_cluster.py down

A head that schedules nothing, worker raylets with their own scratch folders, the Jobs API and a
moto S3 server, all on 127.0.0.1 (tests/multinode.py builds it; docs/cluster.md walks through it).
The cluster's state (pids, ports) is kept in runs/local-cluster.json until `down`.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from multinode import LocalCluster  # noqa: E402  (the harness lives with the tests)

STATE = REPO / "runs" / "local-cluster.json"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=("up", "down", "env"))
    parser.add_argument("--workers", type=int, default=2, help="worker nodes (default 2)")
    parser.add_argument("--worker-cpus", type=int, default=3,
                        help="logical CPUs per worker (default 3, what cluster-smoke is sized for)")
    parser.add_argument("--bucket", default="dfc-runs", help="bucket created on the S3 server (default dfc-runs)")
    args = parser.parse_args(argv)
    if args.action == "up":
        if STATE.exists():
            print(f"{STATE} exists: a cluster is up; run `down` first", file=sys.stderr)
            return 1
        cluster = LocalCluster(workers=args.workers, worker_cpus=args.worker_cpus).up()
        cluster.create_bucket(args.bucket)
        STATE.parent.mkdir(exist_ok=True)
        cluster.save(STATE)
        print(f"up: head + {args.workers} workers, Jobs API {cluster.address}, S3 {cluster.s3_endpoint} "
              f"(bucket s3://{args.bucket}), scratch {cluster.root}")
        return 0
    if not STATE.exists():
        print(f"{STATE}: no cluster is up", file=sys.stderr)
        return 1
    cluster = LocalCluster.load(STATE)
    if args.action == "env":
        for key, value in cluster.client_env().items():
            if key.startswith(("AWS_", "RAY_")):
                print(f"export {key}={shlex.quote(value)}")
        return 0
    cluster.down()
    STATE.unlink()
    print(f"down: every process of the cluster ended (scratch left in {cluster.root})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
