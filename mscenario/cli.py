"""`mscenario train|eval|predict|data …` — the command line.

User mistakes (bad config, bad input rows, missing data) end with one clear paragraph and exit
status 2, never a traceback; bugs still show theirs.

Argument parsing only. Each command imports its implementation when it runs (the one place
in the package that defers mscenario imports): `--help`, `--version` and `data download`
answer without loading JAX (0.1 s instead of 1.5 s), and a SIGTERM while a command is still
importing ends with the preemption message and exit status 75.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import threading

from mscenario import __version__
from mscenario import config as config_lib
from mscenario.data import download
from mscenario.errors import MscenarioError
from mscenario.export.format import DEFAULT_BUCKETS, parse_buckets
from mscenario.serve import Limits

EXIT_PREEMPTED = 75  # EX_TEMPFAIL; the same as mscenario.train.fit.Preempted.EXIT_CODE


def _split_overrides(argv):
  rest, overrides = [], []
  for a in argv:
    (overrides if a.startswith("--config.") else rest).append(a)
  return rest, overrides


def _load_config(args, overrides):
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


@contextlib.contextmanager
def _sigterm_noted():
  """While a command imports the training stack, a SIGTERM is only noted: an exception
  raised inside a module's initialisation (flax's class creation, jaxlib's native init)
  surfaces as a different error (exit 1) or aborts the process. Yields (noted signals,
  whether this thread may set handlers); the previous handler is restored on exit."""
  noted = []
  main_thread = threading.current_thread() is threading.main_thread()
  previous = (signal.signal(signal.SIGTERM, lambda signum, frame: noted.append(signum))
              if main_thread else None)
  try:
    yield noted, main_thread
  finally:
    if main_thread:
      signal.signal(signal.SIGTERM, previous)


def cmd_train(args, overrides):
  # Until the trainer installs its own handler (which saves at the next step boundary), a
  # SIGTERM ends start-up with the same message style and exit status as a preemption:
  # noted while importing, raised at once after.
  with _sigterm_noted() as (noted, main_thread):
    from mscenario.api import train
    if main_thread:
      signal.signal(signal.SIGTERM, _preempted_early)
    if noted:
      _preempted_early(signal.SIGTERM, None)
    config = _load_config(args, overrides)
    train(config, args.workdir)


def cmd_eval(args, overrides):
  from mscenario.train.evaluate import evaluate_workdir
  config = _load_config(args, overrides)
  evaluate_workdir(config, args.workdir, args.split, checkpoint=args.checkpoint)


def cmd_predict(args, overrides):
  from mscenario.train.evaluate import predict_file
  config = _load_config(args, overrides)
  predict_file(config, args.workdir, args.input, args.output, args.checkpoint)


def cmd_encode(args, overrides):
  from mscenario.text.tables import TEXT_DIR, encode_for_config
  config = _load_config(args, overrides)
  index = encode_for_config(config, args.workdir, progress=not args.quiet)
  print(f"text: wrote {os.path.join(args.workdir, TEXT_DIR)} in {index['seconds']}s")
  for name, t in index["tables"].items():
    print(f"  {name:<10} {tuple(t['shape'])}  ({t['with_text']:,} rows with text)")


def cmd_export(args, overrides):
  from mscenario.export import writer
  writer.export(args.workdir, args.out, buckets=args.buckets, checkpoint=args.checkpoint,
                keep=args.keep)


def cmd_serve(args, overrides):
  from mscenario.serve import server
  limits = Limits(
      max_body_bytes=args.max_body_bytes, max_items=args.max_items,
      max_string_chars=args.max_string_chars, request_timeout_s=args.request_timeout_s,
      body_timeout_s=args.body_timeout_s, limit_concurrency=args.limit_concurrency,
      timeout_keep_alive=args.timeout_keep_alive, max_header_bytes=args.max_header_bytes,
      http=args.http)
  server.serve(args.model, args.host, args.port, token_file=args.token_file,
               max_batch_wait_ms=args.max_batch_wait_ms,
               watch_interval_s=args.watch_interval_s, limits=limits)


def cmd_explain(args, overrides):
  from mscenario.api import Run
  Run.open(args.workdir, overrides).explain(args.split, args.rows, args.input, args.out,
                                            steps=args.steps)


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
  e.add_argument("--checkpoint", default="best", choices=("best", "latest"),
                 help="latest: the latest state, e.g. after an update not promoted to best/")
  e.set_defaults(func=cmd_eval)

  pr = sub.add_parser("predict", help="score rows of a CSV/Parquet file")
  pr.add_argument("--workdir", required=True)
  pr.add_argument("--config", help=argparse.SUPPRESS)
  pr.add_argument("--input", required=True, help="CSV or Parquet with the raw feature columns")
  pr.add_argument("--output", required=True, help="CSV to write (row, scenario, probability)")
  pr.add_argument("--checkpoint", default="best", choices=("best", "latest"),
                  help="latest: the latest state, e.g. after an update not promoted to best/")
  pr.set_defaults(func=cmd_predict)

  d = sub.add_parser("data", help="get or inspect data sets")
  dsub = d.add_subparsers(dest="data_command", required=True)
  download.add_cli(dsub)
  i = dsub.add_parser("prepare", help="prepare (or find) the cached dataset and print its summary")
  i.add_argument("--config", required=True)
  i.add_argument("--workdir", default=".")
  i.set_defaults(func=cmd_data_info)

  _add_encode(sub)
  _add_export_serve(sub)
  _add_update(sub)
  _add_explain(sub)
  return p


def _add_update(sub) -> None:
  u = sub.add_parser(
      "update", help="continue a work dir's latest checkpoint on new events (vocabularies "
                     "grow into reserved rows) and optionally export a new model version")
  u.add_argument("--workdir", required=True)
  u.add_argument("--data", required=True, help="CSV/Parquet of new events (the columns "
                                               "`mscenario predict` reads, plus the label)")
  u.add_argument("--out", help="model dir: export the updated model as a new version")
  u.add_argument("--epochs", type=int, default=1)
  u.add_argument("--holdout", type=float, default=0.0,
                 help="fraction of the latest new events kept out of training, to report "
                      "AUC before/after the update")
  u.add_argument("--buckets", type=parse_buckets, default=None,
                 help="export batch sizes, comma-separated (default: as `export`)")
  u.add_argument("--keep", type=int, default=5, help="model versions to keep (0 = all)")
  u.set_defaults(func=cmd_update)


def cmd_update(args, overrides):
  # Until the update takes SIGTERM over (its own fit.Preemption, after the imports), a
  # SIGTERM is only noted, and ends start-up the way a preemption does (exit 75).
  with _sigterm_noted() as (noted, _):
    from mscenario.api import update
    update(args.workdir, args.data, overrides=overrides, epochs=args.epochs,
           holdout=args.holdout, out=args.out, buckets=args.buckets, keep=args.keep,
           stop_requested=lambda: bool(noted))


def _add_encode(sub) -> None:
  p = sub.add_parser("encode", help="encode item, scenario (and user) texts with the language "
                                    "model")
  p.add_argument("--config", required=True, help="configs/NAME.py")
  p.add_argument("--workdir", required=True, help="writes <workdir>/text/*.npy + index.json")
  p.add_argument("--quiet", action="store_true", help="no progress bar")
  p.set_defaults(func=cmd_encode)


def _add_export_serve(sub) -> None:
  e = sub.add_parser("export", help="export a work dir's best model as a servable, "
                                    "versioned predictor directory")
  e.add_argument("--workdir", required=True)
  e.add_argument("--out", required=True, help="model dir; each export adds a version and "
                                              "points MODEL_DIR/CURRENT at it")
  e.add_argument("--buckets", type=parse_buckets, default=DEFAULT_BUCKETS,
                 help="batch sizes to compile, comma-separated (default "
                      f"{','.join(map(str, DEFAULT_BUCKETS))})")
  e.add_argument("--checkpoint", choices=("best", "latest"), default="best")
  e.add_argument("--keep", type=int, default=5, help="versions to keep (0 = all)")
  e.set_defaults(func=cmd_export)

  s = sub.add_parser("serve", help="serve an exported model over HTTP")
  s.add_argument("--model", required=True, help="model dir written by `mscenario export`")
  s.add_argument("--host", default="127.0.0.1", help="default loopback only")
  s.add_argument("--port", type=int, default=8080)
  s.add_argument("--token-file", help="require `Authorization: Bearer <token>` (file content)")
  s.add_argument("--max-batch-wait-ms", type=float, default=0.5,
                 help="how long a request may wait for others to share its batch")
  s.add_argument("--watch-interval-s", type=float, default=1.0,
                 help="poll MODEL_DIR/CURRENT for new versions (0 = only POST /v1/reload)")
  d = Limits()
  s.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes, help="413 beyond")
  s.add_argument("--max-items", type=int, default=d.max_items, help="per call; 413 beyond")
  s.add_argument("--max-string-chars", type=int, default=d.max_string_chars,
                 help="longest string field value; 422 beyond (default %(default)s)")
  s.add_argument("--request-timeout-s", type=float, default=d.request_timeout_s,
                 help="scoring must answer within this, else 503 + Retry-After")
  s.add_argument("--body-timeout-s", type=float, default=d.body_timeout_s,
                 help="reading a request body; 408 beyond")
  s.add_argument("--limit-concurrency", type=int, default=d.limit_concurrency,
                 help="uvicorn: open connections + tasks before it answers 503")
  s.add_argument("--timeout-keep-alive", type=int, default=d.timeout_keep_alive,
                 help="uvicorn: seconds an idle keep-alive connection stays open")
  s.add_argument("--max-header-bytes", type=int, default=d.max_header_bytes,
                 help="uvicorn (h11): request head larger than this -> 400")
  s.add_argument("--http", choices=("h11", "httptools"), default=d.http,
                 help="uvicorn HTTP parser; httptools is faster but has no header-size limit")
  s.set_defaults(func=cmd_serve)


def _add_explain(sub) -> None:
  e = sub.add_parser(
      "explain", help="per-feature attributions (integrated gradients) per row and scenario, "
                      "model internals; writes explain.json, attributions.csv and PNGs")
  e.add_argument("--workdir", required=True)
  e.add_argument("--config", help="unused (the work dir's config is explained)")
  e.add_argument("--split", default="test", choices=("train", "valid", "test"))
  e.add_argument("--rows", type=int, default=2000,
                 help="rows to explain, a seeded sample of the split or input (0 = all)")
  e.add_argument("--input", help="CSV/Parquet of raw rows to explain instead of a split")
  e.add_argument("--out", help="output dir (default: the work dir)")
  e.add_argument("--steps", type=int, default=None,
                 help="integrated-gradients path points (default 256)")
  e.set_defaults(func=cmd_explain)


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
