"""The package's import graph, read from the source with `ast` (nothing is imported).

Layers, bottom to top; a module may import its own layer and the layers below it, never one
above (the data flow: data -> text -> models -> train -> export -> serve -> cli):

  0  errors, flat, config, parallel/, metrics/   no knowledge of data, models or training
  1  data/        sources, transform, cache, pipeline
  2  text/        language-model encoder, text tables, their preparation for a run
  3  models/      Flax modules (leaf layers, embedding, fusion, one file per model, registry)
  4  train/       state, steps, the fit loop, evaluation, checkpoints, the work dir, update
  5  explain/     attributions over a trained run
  6  export/      format.py (the artefact's files and manifest: a leaf, read by serve) and
                  writer.py (training side: a work dir -> a servable version)
  7  serve/       loader + predictor + HTTP service: only export/format.py from below export
  8  api          the Python API
  9  cli, __main__, the package's __init__

Function-local imports are what kept circles hidden, so they count as edges too; and they are
only allowed for heavy optional third-party packages (listed below with the reason).
"""
from __future__ import annotations

import ast
import os

from tests.helpers import REPO

PKG = os.path.join(REPO, "mscenario")

LAYERS = [
    ("mscenario.errors", "mscenario.flat", "mscenario.config", "mscenario.parallel",
     "mscenario.metrics"),
    ("mscenario.data",),
    ("mscenario.text",),
    ("mscenario.models",),
    ("mscenario.train",),
    ("mscenario.explain",),
    ("mscenario.export",),
    ("mscenario.serve",),
    ("mscenario.api",),
    ("mscenario.cli", "mscenario.__main__", "mscenario"),
]

# Edges that run upwards on purpose, each with its reason. Keep this list short.
UPWARD_ALLOWED = {
    # `mscenario.train` is also callable (ms.train(...)); the package forwards the call to the
    # API at call time (Python binds the attribute to the subpackage once anything imports it).
    ("mscenario.train", "mscenario.api"),
}

# Third-party packages that may be imported inside a function: optional or heavy, and needed
# only on one path.
LAZY_THIRD_PARTY = (
    "tensorflow_datasets", "google.protobuf",   # data.source='tfds' only
    "matplotlib",                               # PNG plots only
    "tensorboardX",                             # train.tensorboard only
)

# mscenario modules that may be imported inside a function, with the reason ("*": any).
LAZY_INTERNAL = {
    # `import mscenario` must not load JAX: the API is loaded on attribute access (PEP 562).
    ("mscenario", "*"),
    # The CLI loads a command's implementation when it runs: --help, --version and
    # `data download` answer in 0.1 s instead of 1.5 s (JAX), and a SIGTERM while a command
    # is importing gets the preemption exit.
    ("mscenario.cli", "*"),
    ("mscenario.train", "mscenario.api"),  # the callable package (see UPWARD_ALLOWED)
    # The language model (Flax BERT) only for text-fused versions, on the first new item: a
    # serving host of any other model never loads Flax.
    ("mscenario.serve.predictor", "mscenario.text.encoder"),
}

# Function-local imports still to be moved to the top, per file (files being reorganised
# by other changes). The counts may only go down.
NOT_YET: dict[str, int] = {}


def _module_name(path: str) -> str:
  rel = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
  return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def _modules() -> dict[str, str]:
  out = {}
  for root, _, files in os.walk(PKG):
    for f in files:
      if f.endswith(".py"):
        path = os.path.join(root, f)
        out[_module_name(path)] = path
  return out


MODULES = _modules()


def _resolve(name: str) -> str | None:
  """The mscenario module an imported name refers to (a submodule, or the module defining
  the attribute), or None for third-party names."""
  while name and name not in MODULES:
    name = name.rpartition(".")[0]
  return name or None


def _imports(path: str, module: str):
  """[(imported name, line, local?)] of one file; relative imports resolved."""
  with open(path, encoding="utf-8") as f:
    tree = ast.parse(f.read(), path)
  is_pkg = path.endswith("__init__.py")
  top_level = set(map(id, tree.body))
  # Statements under `if`/`try` at module level are still module-level imports.
  for node in tree.body:
    if isinstance(node, (ast.If, ast.Try)):
      top_level |= {id(n) for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom))}
  out = []
  for node in ast.walk(tree):
    local = id(node) not in top_level
    if isinstance(node, ast.Import):
      out += [(a.name, node.lineno, local) for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        parts = module.split(".")
        parts = parts if is_pkg else parts[:-1]
        parts = parts[: len(parts) - node.level + 1]
        base = ".".join(parts + ([base] if base else []))
      if node.module == "__future__":
        continue
      for a in node.names:
        full = f"{base}.{a.name}"
        out.append((full if _resolve(full) == full else base, node.lineno, local))
  return out


def _graph():
  """module -> {imported mscenario module: (line, local?)}."""
  graph = {}
  for module, path in MODULES.items():
    edges = {}
    for name, line, local in _imports(path, module):
      target = _resolve(name) if name.startswith("mscenario") else None
      if target and target != module:
        edges.setdefault(target, (line, local))
    graph[module] = edges
  return graph


def _layer(module: str) -> int:
  best, rank = -1, None
  for i, prefixes in enumerate(LAYERS):
    for p in prefixes:
      if (module == p or module.startswith(p + ".")) and len(p) > best:
        best, rank = len(p), i
  assert rank is not None, f"{module} is in no layer: add it to LAYERS (and the docstring)"
  return rank


def test_every_module_has_a_layer():
  for module in MODULES:
    _layer(module)


def test_no_import_cycles():
  graph = _graph()
  state: dict[str, int] = {}
  stack: list[str] = []
  cycles = []

  def visit(m):
    state[m] = 1
    stack.append(m)
    for n in sorted(graph.get(m, ())):
      if state.get(n) == 1:
        cycles.append(stack[stack.index(n):] + [n])
      elif n not in state:
        visit(n)
    stack.pop()
    state[m] = 2

  for m in sorted(graph):
    if m not in state:
      visit(m)
  assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_no_import_runs_up_a_layer():
  bad = []
  for module, edges in sorted(_graph().items()):
    for target, (line, _) in sorted(edges.items()):
      if _layer(target) > _layer(module) and (module, target) not in UPWARD_ALLOWED:
        bad.append(f"{MODULES[module]}:{line}: {module} (layer {_layer(module)}) imports "
                   f"{target} (layer {_layer(target)})")
  assert not bad, "imports running up the layers:\n" + "\n".join(bad)


def test_serve_needs_no_training_code():
  """serve/ and everything it imports, directly or not (function-local imports included): no
  train/, models/, explain/ and no export writer. A serving host needs only the artefact
  loader (export/format.py)."""
  graph = _graph()
  forbidden = ("mscenario.train", "mscenario.models", "mscenario.explain",
               "mscenario.export.writer", "mscenario.api", "mscenario.cli")
  bad = set()
  for start in [m for m in MODULES if m == "mscenario.serve" or m.startswith("mscenario.serve.")]:
    parent = {start: None}
    todo = [start]
    while todo:
      m = todo.pop()
      for target, (line, _) in sorted(graph[m].items()):
        if target in parent:
          continue
        parent[target] = m
        if target == forbidden or target.startswith(forbidden):
          chain, at = [target], m
          while at is not None:
            chain.append(at)
            at = parent[at]
          bad.add(" -> ".join(reversed(chain)))
        else:
          todo.append(target)
  assert not bad, "serve reaches training code:\n" + "\n".join(sorted(bad))


def _local_import_violations() -> dict[str, list[str]]:
  """file -> ['line: name'] of function-local imports the rules above do not allow."""
  out: dict[str, list[str]] = {}
  for module, path in sorted(MODULES.items()):
    for name, line, local in _imports(path, module):
      if not local:
        continue
      if name.startswith("mscenario"):
        target = _resolve(name)
        if (module, "*") in LAZY_INTERNAL or (module, target) in LAZY_INTERNAL:
          continue
      elif any(name == p or name.startswith(p + ".") for p in LAZY_THIRD_PARTY):
        continue
      rel = os.path.relpath(path, REPO)
      entry = f"{rel}:{line}: {name}"
      if entry not in out.get(rel, []):
        out.setdefault(rel, []).append(entry)
  return out


def test_function_local_imports_only_for_heavy_optional_packages():
  bad = []
  for rel, entries in _local_import_violations().items():
    lines = {e.split(":")[1] for e in entries}
    if len(lines) > NOT_YET.get(rel, 0):
      bad += entries
  assert not bad, ("function-local imports (move them to the top; only the heavy optional "
                   "packages listed in LAZY_THIRD_PARTY may wait):\n" + "\n".join(bad))


LONG_MODULE_LINES = 350


def test_long_modules_say_why_in_their_docstring():
  """Modules are short enough to read in one sitting; one that is longer says why it is one
  file (a docstring paragraph starting 'Length:')."""
  bad = []
  for module, path in sorted(MODULES.items()):
    with open(path, encoding="utf-8") as f:
      text = f.read()
    doc = "\n" + (ast.get_docstring(ast.parse(text)) or "")
    if text.count("\n") > LONG_MODULE_LINES and "\nLength: " not in doc:
      bad.append(f"{os.path.relpath(path, REPO)}: {text.count(chr(10))} lines")
  assert not bad, "long modules without a 'Length:' reason in their docstring:\n" + "\n".join(bad)
