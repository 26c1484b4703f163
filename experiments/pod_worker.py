"""One process of a local pod (tests/test_pod.py, experiments/bench_pod.py).

    python experiments/pod_worker.py JOBS_JSON

runs every job ``{"base", "experts", "out", "method", "kwargs", "boost", "alpha", "chunk_bytes"}``
with `subboost.merge_from_checkpoints`. With ``JAX_NUM_PROCESSES`` > 1 in the environment
(and ``JAX_COORDINATOR_ADDRESS``, ``JAX_PROCESS_ID``) it first joins the others
(`subboost.streaming.pod.initialize`); otherwise it is an ordinary single process. A
``kwargs["key"]`` integer becomes ``jax.random.key(key)``. Prints one JSON line per job:
``{"out", "error": one-line message or null, "peak_rss": bytes, "rchar": bytes read() so far}``.
"""

import json
import os
import resource
import sys

jobs = json.loads(sys.argv[1])
if int(os.environ.get("JAX_NUM_PROCESSES", "1")) > 1:
    from subboost.streaming import pod

    pod.initialize(heartbeat_timeout_seconds=20)

import jax  # noqa: E402

import subboost as sb  # noqa: E402

for job in jobs:
    kwargs = dict(job.get("kwargs", {}))
    if "key" in kwargs:
        kwargs["key"] = jax.random.key(kwargs["key"])
    error = None
    try:
        sb.merge_from_checkpoints(job["base"], job["experts"], method=job["method"], boost=job.get("boost"),
                                  out=job["out"], alpha=job.get("alpha"), progress=False,
                                  chunk_bytes=job.get("chunk_bytes", 256 * 2**20), **kwargs)
    except sb.SubboostError as err:
        error = str(err)
    with open("/proc/self/io") as f:
        rchar = int(dict(line.split(": ") for line in f.read().splitlines())["rchar"])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"out": job["out"], "error": error, "peak_rss": peak, "rchar": rchar}), flush=True)
