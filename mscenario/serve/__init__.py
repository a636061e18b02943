"""Export a trained model and serve it online: `mscenario export|serve`.

Imports stay lazy: `mscenario serve` must not pull in the training code paths.
"""
from __future__ import annotations

import argparse

DEFAULT_BUCKETS = (1, 8, 64, 512, 2048)


def _buckets(text: str) -> tuple[int, ...]:
  try:
    out = tuple(sorted({int(x) for x in text.split(",") if x.strip()}))
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected comma-separated sizes, got {text!r}") from None
  if not out or out[0] < 1:
    raise argparse.ArgumentTypeError("bucket sizes must be >= 1")
  return out


def cmd_export(args, overrides):
  from mscenario.serve import export
  export.export(args.workdir, args.out, buckets=args.buckets, checkpoint=args.checkpoint,
                keep=args.keep)


def cmd_serve(args, overrides):
  from mscenario.serve import server
  limits = server.Limits(max_body_bytes=args.max_body_bytes, max_items=args.max_items)
  server.serve(args.model, args.host, args.port, token_file=args.token_file,
               max_batch_wait_ms=args.max_batch_wait_ms,
               watch_interval_s=args.watch_interval_s, limits=limits)


def add_cli(subparsers) -> None:
  """Adds `export` and `serve` to the top-level `mscenario` parser."""
  e = subparsers.add_parser("export", help="export a work dir's best model as a servable, "
                                           "versioned predictor directory")
  e.add_argument("--workdir", required=True)
  e.add_argument("--out", required=True, help="model dir; each export adds a version and "
                                              "points MODEL_DIR/CURRENT at it")
  e.add_argument("--buckets", type=_buckets, default=DEFAULT_BUCKETS,
                 help="batch sizes to compile, comma-separated (default "
                      f"{','.join(map(str, DEFAULT_BUCKETS))})")
  e.add_argument("--checkpoint", choices=("best", "latest"), default="best")
  e.add_argument("--keep", type=int, default=5, help="versions to keep (0 = all)")
  e.set_defaults(func=cmd_export)

  s = subparsers.add_parser("serve", help="serve an exported model over HTTP")
  s.add_argument("--model", required=True, help="model dir written by `mscenario export`")
  s.add_argument("--host", default="127.0.0.1", help="default loopback only")
  s.add_argument("--port", type=int, default=8080)
  s.add_argument("--token-file", help="require `Authorization: Bearer <token>` (file content)")
  s.add_argument("--max-batch-wait-ms", type=float, default=0.5,
                 help="how long a request may wait for others to share its batch")
  s.add_argument("--watch-interval-s", type=float, default=1.0,
                 help="poll MODEL_DIR/CURRENT for new versions (0 = only POST /v1/reload)")
  s.add_argument("--max-body-bytes", type=int, default=4 << 20)
  s.add_argument("--max-items", type=int, default=10_000)
  s.set_defaults(func=cmd_serve)
