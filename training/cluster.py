"""Which replica of a training cluster this process is, and the strategy it trains with.

hubflow-train trains on one machine, with all of its GPUs (``MirroredStrategy``), never across
machines: its models (a head on embeddings, a fine-tuned backbone, a small net) train in
minutes on one, and a run owns its model dir alone (one lock, one writer). A job that starts
several replicas (a Vertex AI custom job with more than one replica in its worker pools) sets
``TF_CONFIG`` on each of them; there, :func:`should_train` lets exactly one replica train:

* the primary: ``TF_CONFIG`` task ``chief`` (Vertex AI's first worker pool) or ``master``,
  Vertex AI ``CLUSTER_SPEC`` task ``workerpool0``, or worker 0 of a cluster without either;
  it trains, evaluates and exports as it would alone, after one warning that the others idle;
* every other replica (workers, parameter servers, evaluators) logs one line and returns
  False: ``hubflow-train`` exits 0 without reading ``--data_dir`` or touching ``--model_dir``,
  so it never fails the job, whose outcome is the primary's.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Mapping

from schemas.cli import UsageError

_LOGGER = logging.getLogger(__name__)
# The task types of a cluster's primary replica: TF_CONFIG's (Vertex AI names its first worker
# pool "chief"; AI Platform's legacy runtime "master") and Vertex AI's CLUSTER_SPEC's.
PRIMARY_TYPES = ("chief", "master", "workerpool0")
WORKER = "worker"
ENV_VARS = ("TF_CONFIG", "CLUSTER_SPEC")  # the first one set is read


@dataclasses.dataclass(frozen=True)
class Replica:
    """This process in its cluster: its task, the number of replicas, whether it trains."""

    task_type: str = ""  # "" outside a cluster
    index: int = 0
    replicas: int = 1
    primary: bool = True

    def describe(self) -> str:
        if not self.task_type:
            return "a single replica"
        return f"replica {self.task_type}:{self.index} of {self.replicas}"


def this_replica(environ: Mapping[str, str] | None = None) -> Replica:
    """Reads ``TF_CONFIG`` (or, without it, ``CLUSTER_SPEC``) from ``environ`` (default: os).

    Raises:
      UsageError: the variable is set but is not a JSON object.
    """
    environ = os.environ if environ is None else environ
    name = next((n for n in ENV_VARS if environ.get(n, "").strip()), None)
    if name is None:
        return Replica()
    try:
        spec = json.loads(environ[name])
        if not isinstance(spec, dict):
            raise ValueError("not a JSON object")
        cluster = spec.get("cluster") or {}
        task = spec.get("task") or {}
        task_type, index = str(task.get("type", "")), int(task.get("index", 0))
        replicas = sum(len(addresses) for addresses in cluster.values())
    except (ValueError, TypeError, AttributeError) as e:
        raise UsageError(f"the {name} environment variable is not a cluster spec: {e}") from None
    if not task_type:  # a cluster without a task names no role for this process
        return Replica(replicas=max(replicas, 1))
    chief = any(t in cluster for t in PRIMARY_TYPES)
    primary = task_type in PRIMARY_TYPES or (task_type == WORKER and index == 0 and not chief)
    return Replica(task_type, index, max(replicas, 1), primary)


def should_train(environ: Mapping[str, str] | None = None) -> bool:
    """True on the replica that trains; logs one line where others exist or this one idles.

    Raises:
      UsageError: ``TF_CONFIG`` / ``CLUSTER_SPEC`` is not a cluster spec.
    """
    replica = this_replica(environ)
    if not replica.primary:
        _LOGGER.info(
            "%s: hubflow-train trains on the primary replica only; this one exits without "
            "reading or writing anything",
            replica.describe(),
        )
        return False
    if replica.replicas > 1:
        _LOGGER.warning(
            "%s: hubflow-train trains on this primary replica alone (its GPUs mirrored); the "
            "other %d exit at once and their machines do nothing: run the job with one worker "
            "pool of one replica",
            replica.describe(),
            replica.replicas - 1,
        )
    return True


def strategy_kind(num_gpus: int) -> str:
    """``mirrored`` over several local GPUs, ``default`` otherwise (one machine trains)."""
    return "mirrored" if num_gpus > 1 else "default"
