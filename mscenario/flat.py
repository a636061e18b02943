"""Nested dicts <-> flat {'a/b/c': leaf} dicts: safetensors files need flat names (no pickled
trees), and config comparisons read best key by key."""
from __future__ import annotations

from typing import Any


def flatten(tree: dict, prefix: str = "", sep: str = "/") -> dict[str, Any]:
  """Nested dicts -> {'a/b/c': leaf}: the file format needs flat names, not pickled trees.
  (The trainer uses it too, with sep='.', to compare configs key by key.)"""
  out = {}
  for k, v in tree.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(flatten(v, key + sep, sep))
    else:
      out[key] = v
  return out


def unflatten(flat: dict[str, Any]) -> dict:
  out: dict = {}
  for key, v in flat.items():
    node = out
    *parents, leaf = key.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = v
  return out
