"""The CF recipe under its issue-14 name: since the CF state became servable end to end,
configs/ml1m_best.py *is* MMoE + gated item text + data.collaborative; this file loads it
(kept so that the BENCHMARKS.md §12 commands still run)."""
import importlib.util
import os


def get_config():
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ml1m_best.py")
  spec = importlib.util.spec_from_file_location("_ml1m_best", path)
  best = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(best)
  c = best.get_config()
  c.data.collaborative.enabled = True
  return c
