"""Export a trained model and serve it online: `mscenario export|serve`.

Imports stay lazy: `mscenario serve` must not pull in the training code paths.
"""
from __future__ import annotations

import argparse
import dataclasses

DEFAULT_BUCKETS = (1, 8, 64, 512, 2048)


@dataclasses.dataclass
class Limits:
  """What one client can make the server hold or wait for (CLI flags of `mscenario serve`)."""
  max_body_bytes: int = 4 << 20      # 413 beyond this
  max_items: int = 10_000            # items per HTTP request (all sub-requests together)
  max_requests: int = 1_000          # sub-requests in the batch form
  max_batch_rows: int = 8192         # rows the batcher scores in one go
  max_string_chars: int = 256        # any string field (422 beyond): arrays are fixed-width
  max_list_len: int = 256            # values of one multi-valued field
  max_queued_rows: int = 65_536      # rows waiting to be scored; 503 + Retry-After beyond
  request_timeout_s: float = 30.0    # scoring must answer by then, else 503 + Retry-After
  body_timeout_s: float = 30.0       # reading one request body; 408 beyond
  # uvicorn's own settings (see uvicorn_config)
  limit_concurrency: int = 256       # open connections + tasks; uvicorn answers 503 beyond
  timeout_keep_alive: int = 5        # idle keep-alive connections are closed after this
  max_header_bytes: int = 16 << 10   # h11_max_incomplete_event_size: headers beyond -> 400
  # h11, not httptools: httptools has no header-size limit (a 1 MB header is read whole);
  # 'httptools' is faster where a proxy in front already bounds headers.
  http: str = "h11"


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
  limits = server.Limits(
      max_body_bytes=args.max_body_bytes, max_items=args.max_items,
      max_string_chars=args.max_string_chars, request_timeout_s=args.request_timeout_s,
      body_timeout_s=args.body_timeout_s, limit_concurrency=args.limit_concurrency,
      timeout_keep_alive=args.timeout_keep_alive, max_header_bytes=args.max_header_bytes,
      http=args.http)
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
