"""The processes of the evaluation scripts: one, or several through Lightning Fabric.

``devices=N`` (with ``num_nodes``) starts N local processes with Fabric's launcher, as the
trainer does for training; under ``torchrun`` or SLURM (``srun``) Fabric joins the processes the
launcher started instead. Processes talk over NCCL on GPUs and gloo on the CPU; the evaluation
engine shards the images over them and torchmetrics reduces the metric states.
"""
from __future__ import annotations

import os

import torch
from lightning_fabric import Fabric

from evaluation.preflight import resolve_device
from gcmodels.options import ConfigError

# Set by torchrun (torch.distributed.run) in every process it starts.
TORCHRUN_LOCAL_PROCESSES = "LOCAL_WORLD_SIZE"


def start_processes(device: str, devices: int, num_nodes: int) -> Fabric:
    """The launched Fabric of this process (its ``device``, ``global_rank``, ``world_size``).

    ``device``: ``auto``, ``cpu``, ``cuda`` or ``cuda:<index>`` (one process only); ``devices``
    processes per node, on ``num_nodes`` nodes. Under torchrun the processes per node are
    torchrun's (``--nproc-per-node``) and ``devices``, left at 1, follows them."""
    resolved = resolve_device(device)
    if TORCHRUN_LOCAL_PROCESSES in os.environ and devices == 1:
        devices = int(os.environ[TORCHRUN_LOCAL_PROCESSES])
    if resolved.index is not None and devices > 1:
        raise ConfigError([("device", f"{device!r} names one GPU, and devices={devices} asks for {devices} "
                                      f"processes: use device=cuda (each process takes its own GPU) or devices=1")])
    if resolved.type == "cuda" and devices > torch.cuda.device_count():
        raise ConfigError([("devices", f"{devices} processes, one per GPU, and this machine has "
                                       f"{torch.cuda.device_count()} GPU(s)")])
    several = devices * num_nodes > 1
    fabric = Fabric(accelerator=resolved.type, devices=[resolved.index] if resolved.index is not None else devices,
                    num_nodes=num_nodes, strategy="ddp" if several else "auto")
    fabric.launch()
    return fabric

