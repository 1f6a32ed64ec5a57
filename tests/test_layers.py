"""The evaluation package's library layer (explainers, metrics, attacks, reference maps,
composites, tables, figures) works without Lightning and Hydra, so that other code can use it
alone; the application layer (evaluator, settings, callbacks, scripts, reports) builds on it."""
import subprocess
import sys

from tests.conftest import ROOT

LIBRARY = ["evaluation.explainers", "evaluation.metrics", "evaluation.attacks", "evaluation.references",
           "evaluation.composites", "evaluation.tables", "evaluation.figures", "losses", "gcmodels.networks",
           "gcmodels.gradcam", "gcmodels.objectives"]


def test_the_library_layer_imports_neither_lightning_nor_hydra():
    script = ("import importlib, sys\n"
              f"for name in {LIBRARY!r}:\n"
              "    importlib.import_module(name)\n"
              "print(sorted(m for m in ('pytorch_lightning', 'lightning', 'hydra') if m in sys.modules))\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
