"""`mscenario train|eval|predict|data …` — the command line.

User mistakes (bad config, bad input rows, missing data) end with one clear paragraph and exit
status 2, never a traceback; bugs still show theirs.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading

from mscenario.errors import MscenarioError

EXIT_PREEMPTED = 75  # EX_TEMPFAIL; the same as mscenario.train.fit.Preempted.EXIT_CODE


def _split_overrides(argv):
  rest, overrides = [], []
  for a in argv:
    (overrides if a.startswith("--config.") else rest).append(a)
  return rest, overrides


def _load_config(args, overrides):
  from mscenario import config as config_lib
  if args.config:
    return config_lib.load_config(args.config, overrides)
  from mscenario.train.workdir import CONFIG, WorkDir
  wd = WorkDir(args.workdir)
  if not wd.exists(CONFIG):
    raise MscenarioError(f"no --config given and {wd.file(CONFIG)} does not exist: pass "
                         "--config configs/NAME.py (or a work dir of a previous run)")
  return wd.read_config(overrides)


class _PreemptedEarly(Exception):
  """SIGTERM before training started (imports, data preparation, compilation): nothing to save."""


def _preempted_early(signum, frame):
  raise _PreemptedEarly("preempted (SIGTERM) before the first training step: nothing needed "
                        "saving; run the same command to start (or resume)")


def cmd_train(args, overrides):
  # Until the trainer installs its own handler (which saves at the next step boundary), a
  # SIGTERM ends start-up with the same message style and exit status as a preemption.
  main_thread = threading.current_thread() is threading.main_thread()
  previous = signal.signal(signal.SIGTERM, _preempted_early) if main_thread else None
  try:
    from mscenario.train.loop import train
    config = _load_config(args, overrides)
    train(config, args.workdir)
  finally:
    if main_thread:
      signal.signal(signal.SIGTERM, previous)


def cmd_eval(args, overrides):
  from mscenario.train.evaluate import evaluate_workdir
  config = _load_config(args, overrides)
  evaluate_workdir(config, args.workdir, args.split)


def cmd_predict(args, overrides):
  from mscenario.train.evaluate import predict_file
  config = _load_config(args, overrides)
  predict_file(config, args.workdir, args.input, args.output)


def cmd_data_info(args, overrides):
  from mscenario.data.prepare import prepare
  config = _load_config(args, overrides)
  data = prepare(config)
  print(json.dumps({"path": data.path, **data.meta}, indent=2))


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="mscenario",
      description="Multi-scenario interest prediction with JAX/Flax. Any --config.KEY=VALUE "
                  "argument overrides the config (e.g. --config.train.epochs=3).")
  from mscenario import __version__
  p.add_argument("--version", action="version", version=f"mscenario {__version__}")
  sub = p.add_subparsers(dest="command", required=True)

  t = sub.add_parser("train", help="train (or resume) a model in a work dir")
  t.add_argument("--config", help="configs/NAME.py (omit to resume a work dir's config)")
  t.add_argument("--workdir", required=True)
  t.set_defaults(func=cmd_train)

  e = sub.add_parser("eval", help="evaluate a work dir's best checkpoint")
  e.add_argument("--workdir", required=True)
  e.add_argument("--config", help=argparse.SUPPRESS)
  e.add_argument("--split", default="test", choices=("train", "valid", "test"))
  e.set_defaults(func=cmd_eval)

  pr = sub.add_parser("predict", help="score rows of a CSV/Parquet file")
  pr.add_argument("--workdir", required=True)
  pr.add_argument("--config", help=argparse.SUPPRESS)
  pr.add_argument("--input", required=True, help="CSV or Parquet with the raw feature columns")
  pr.add_argument("--output", required=True, help="CSV to write (row, scenario, probability)")
  pr.set_defaults(func=cmd_predict)

  d = sub.add_parser("data", help="get or inspect data sets")
  dsub = d.add_subparsers(dest="data_command", required=True)
  from mscenario.data import download
  download.add_cli(dsub)
  i = dsub.add_parser("prepare", help="prepare (or find) the cached dataset and print its summary")
  i.add_argument("--config", required=True)
  i.add_argument("--workdir", default=".")
  i.set_defaults(func=cmd_data_info)

  from mscenario.text import tables as text_tables
  text_tables.add_cli(sub)
  from mscenario import serve as serve_cli
  serve_cli.add_cli(sub)
  from mscenario.train import update as update_cli
  update_cli.add_cli(sub)
  from mscenario.explain import run as explain_cli
  explain_cli.add_cli(sub)
  return p


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  rest, overrides = _split_overrides(argv)
  args = build_parser().parse_args(rest)
  try:
    if args.func.__module__ == "mscenario.data.download":
      return args.func(args)
    args.func(args, overrides)
  except MscenarioError as e:
    print(f"mscenario: error: {e}", file=sys.stderr)
    return 2
  except _PreemptedEarly as e:
    print(f"mscenario: {e}", file=sys.stderr)
    return EXIT_PREEMPTED
  except Exception as e:  # noqa: BLE001 -- only the preemption exit is handled here
    from mscenario.train.fit import Preempted
    if not isinstance(e, Preempted):
      raise
    print(f"mscenario: {e}", file=sys.stderr)
    return EXIT_PREEMPTED
  except KeyboardInterrupt:
    print("mscenario: interrupted; the work dir keeps the last checkpoint (run the same "
          "command to resume)", file=sys.stderr)
    return 130
  return 0


def entry() -> None:
  """Console-script entry point. After a user error (exit status 2) the process leaves with
  os._exit once output is flushed: tearing down the interpreter while native thread pools
  (XLA, Arrow) are still alive occasionally aborts ("terminate called without an active
  exception"), which would turn a clear message into a crash. Checkpoints and logs are
  already closed on that path; a successful run exits normally."""
  code = main()
  if code == 2:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(2)
  sys.exit(code)


if __name__ == "__main__":
  entry()
