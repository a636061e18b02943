"""Serve an exported model online (`mscenario serve`): predictor.py loads a version written
by mscenario/export/ and scores raw requests, server.py is the HTTP service.

Imports no training code: a serving host needs only the artefact (export/format.py).
"""
from __future__ import annotations

import dataclasses

from mscenario.export.format import DEFAULT_BUCKETS  # noqa: F401  (the server's batch sizes)


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
