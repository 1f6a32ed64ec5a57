"""The process's random streams as a checkpoint can carry them (plain types and tensors, which a
checkpoint read with ``weights_only=True`` can hold), per process under DDP."""
from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def global_random_state() -> dict:
    """The process's global random streams (torch, CUDA, numpy, python) as tensors and plain
    types, which a checkpoint read with ``weights_only=True`` can hold."""
    _, keys, position, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
    }


def set_global_random_state(state: dict) -> None:
    """Inverse of :func:`global_random_state`. CUDA streams are restored only onto as many
    devices as were saved: on other hardware they restart from the seed."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    numpy_state = state["numpy"]
    np.random.set_state(("MT19937", numpy_state["keys"].numpy().astype(np.uint32), numpy_state["position"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    python_state = state["python"]
    random.setstate((python_state["version"], tuple(python_state["internal"]), python_state["gauss_next"]))


def gather_per_rank(value: Any) -> list:
    """``value`` of every process, in rank order (one element without distributed training). A
    collective: every process must call it, as every process dumps each checkpoint."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [value]
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, value)
    return gathered
