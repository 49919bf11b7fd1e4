"""What the cluster serves: every live worker of every host, grouped by host, against the desired
state (`GET /_hotdeploy/cluster`, `hotdeploy cluster`). A worker lags on a package when it does
not serve the desired version (yet: one that just started, or one that lost the database)."""

from __future__ import annotations

import time
from typing import Any

from ._cluster import Cluster
from ._store import Store


def cluster_view(store: Store, cluster: Cluster) -> dict[str, Any]:
    """A blocking call: it reads the store."""
    desired = store.desired()
    now = time.time()
    hosts: dict[str, list[dict[str, Any]]] = {}
    for worker in cluster.workers():
        host = worker.id.partition(":")[0]
        lag = sorted(name for name, wanted in desired.items() if worker.serving.get(name) != wanted.version)
        hosts.setdefault(host, []).append(
            {
                "id": worker.id,
                "pid": worker.pid,
                "started_at": worker.started_at,
                "heartbeat_age": round(max(now - worker.heartbeat_at, 0.0), 3),
                "serving": dict(sorted(worker.serving.items())),
                "lagging": lag,
            }
        )
    return {
        "store": store.describe(),
        "host": cluster.host,
        "worker": cluster.worker_id,
        "generation": store.generation(),
        "desired": {name: {"version": d.version, "sha256": d.sha256} for name, d in sorted(desired.items())},
        "hosts": [
            {"host": host, "workers": workers, "lagging": sorted({n for w in workers for n in w["lagging"]})}
            for host, workers in sorted(hosts.items())
        ],
    }
