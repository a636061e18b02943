"""Multi-controller start-up: `jax.distributed.initialize`, never a home-made cluster.

On TPU VMs and under SLURM JAX discovers the coordinator itself; elsewhere (several processes
on one machine, a GPU cluster without SLURM) the config or the environment names it.
"""
from __future__ import annotations

import os

import jax

from mscenario.errors import ConfigError


def _env(name: str, default=None):
  return os.environ.get(f"MSCENARIO_{name}", default)


def maybe_initialize(dist_cfg) -> None:
  """Initialise jax.distributed when the config/env asks for it or a cluster is detected.

  MSCENARIO_DISTRIBUTED=auto calls `jax.distributed.initialize()` with no arguments (JAX finds
  the coordinator itself: Cloud TPU VM metadata, SLURM, Open MPI); launch/tpu_vm.sh sets it,
  because a GCE TPU VM slice sets no environment variable that could be tested here.
  MSCENARIO_DISTRIBUTED=off never initialises (one process inside a multi-task allocation).
  """
  if jax.distributed.is_initialized():
    return
  mode = str(_env("DISTRIBUTED", "")).strip().lower()
  if mode in ("off", "0", "false", "no"):
    return
  coordinator = dist_cfg.coordinator or _env("COORDINATOR", "")
  num = int(dist_cfg.num_processes or _env("NUM_PROCESSES", 0) or 0)
  pid = int(dist_cfg.process_id if dist_cfg.process_id >= 0 else _env("PROCESS_ID", -1))
  if coordinator:
    if num <= 0 or pid < 0:
      raise ConfigError("distributed.coordinator is set: also set distributed.num_processes "
                        "and distributed.process_id (or MSCENARIO_NUM_PROCESSES / "
                        "MSCENARIO_PROCESS_ID)")
    # CPU collectives across processes (tests, laptops); no effect on TPU/GPU backends. Set
    # before initialize: touching jax.devices() first would start a single-process backend.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num,
                               process_id=pid,
                               initialization_timeout=int(_env("INIT_TIMEOUT", 300)))
  elif mode in ("auto", "1", "true", "yes"):
    jax.distributed.initialize()
  elif "SLURM_JOB_ID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
    jax.distributed.initialize()
  elif os.environ.get("TPU_WORKER_HOSTNAMES") and "," in os.environ["TPU_WORKER_HOSTNAMES"]:
    jax.distributed.initialize()
