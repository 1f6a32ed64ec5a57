"""On-disk store of committee members' explanations, so a committee grows one member at a time.

A run (the images, the explainer and its options, the explained class, the common resolution, the
data) has a digest; a member is the SHA-256 of its network's description and weights
(``committee.weights_digest``). Each (run, member)
entry is a folder of ``.npy`` arrays (explanations in float16) and a ``meta.json`` written last, so
an entry is either complete or absent: re-running with one more checkpoint computes only that
member, a crash never leaves half an entry that a later run would trust, and of two writers of
one entry (processes sharing the store) the first to finish wins and the other keeps its copy.
Arrays are read back memory-mapped, so scoring a committee never holds more than the slices it is working on.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from gcmodels.files import json_digest, staged

META = "meta.json"


def settings_digest(settings: dict) -> str:
    """Digest of JSON-serialisable settings, independent of key order."""
    return json_digest(settings, 16)


class ExplanationStore:
    """Entries under ``root/<run digest>/<member digest>/``, plus arrays shared by every member of
    a run (e.g. LIME's superpixels) under ``root/<run digest>/shared/``."""

    def __init__(self, root: str | Path, run_settings: dict):
        self.root = Path(root)
        self.run_settings = run_settings
        self.run_dir = self.root / settings_digest(run_settings)

    def _read(self, folder: Path) -> dict[str, Any] | None:
        try:
            meta = json.loads((folder / META).read_text())
            arrays = {name: np.load(folder / f"{name}.npy", mmap_mode="r") for name in meta["arrays"]}
        except (OSError, ValueError, KeyError):
            return None  # absent, or damaged by hand: computed again
        return {"meta": meta["meta"], **arrays}

    def _write(self, folder: Path, arrays: dict[str, np.ndarray], meta: dict) -> None:
        try:
            with staged(folder, directory=True) as staging:
                for name, array in arrays.items():
                    np.save(staging / f"{name}.npy", array)
                record = {"arrays": sorted(arrays), "meta": meta, "run": self.run_settings}
                (staging / META).write_text(json.dumps(record, indent=1))  # last: marks completion
                if folder.exists() and self._read(folder) is None:
                    shutil.rmtree(folder)  # an incomplete entry, or one damaged by hand
        except OSError:
            # The rename found the entry there: another writer (a process of this run, or another
            # run on the same store) finished it first. Its arrays are the same: keep them.
            if self._read(folder) is None:
                raise

    def load_member(self, member: str) -> dict[str, Any] | None:
        """The member's arrays (memory-mapped) and ``meta``, or None when it is not stored."""
        return self._read(self.run_dir / member)

    def save_member(self, member: str, arrays: dict[str, np.ndarray], meta: dict) -> None:
        self._write(self.run_dir / member, arrays, meta)

    def load_shared(self) -> dict[str, Any] | None:
        return self._read(self.run_dir / "shared")

    def save_shared(self, arrays: dict[str, np.ndarray], meta: dict) -> None:
        self._write(self.run_dir / "shared", arrays, meta)
