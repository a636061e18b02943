"""Sentences/s of the Flax text encoder vs sentence-transformers (torch) on the same CPU.

  python benchmarks/text_encoder.py [--n 2000] [--batch-size 64] \
      [--st-python /tmp/refenv/bin/python]   # a Python with torch + sentence-transformers

The texts are MovieLens-like item texts ("Title (Year). Genres: A, B"), made deterministically.
Ours is timed twice: cold (including XLA compilation of the bucketed shapes) and warm.
sentence-transformers runs in a subprocess of the other Python (mscenario never imports torch).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

WORDS = ("the last night star river king lost city dark love story war man woman house blue "
         "secret return little big dead summer winter great American game heart time road "
         "home shadow girl boy dream fire island murder ghost wild party school tale").split()
GENRES = ("Action Adventure Animation Children's Comedy Crime Documentary Drama Fantasy "
          "Film-Noir Horror Musical Mystery Romance Sci-Fi Thriller War Western").split()

ST_SCRIPT = r"""
import json, sys, time
import torch
from sentence_transformers import SentenceTransformer
texts, model_dir, bs = json.load(open(sys.argv[1])), sys.argv[2], int(sys.argv[3])
m = SentenceTransformer(model_dir, device="cpu")
m.encode(texts[:bs], batch_size=bs)  # warm-up
t = time.perf_counter(); m.encode(texts, batch_size=bs); dt = time.perf_counter() - t
print(json.dumps({"seconds": dt, "threads": torch.get_num_threads(), "torch": torch.__version__}))
"""


def movielens_like(n: int, seed: int = 0) -> list[str]:
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    title = " ".join(rng.choice(WORDS, rng.integers(1, 7))).title()
    if rng.random() < 0.2:
      title += ": " + " ".join(rng.choice(WORDS, rng.integers(1, 4))).title()
    genres = ", ".join(rng.choice(GENRES, rng.integers(1, 4), replace=False))
    out.append(f"{title} ({rng.integers(1920, 2001)}). Genres: {genres}")
  return out


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--n", type=int, default=2000)
  ap.add_argument("--batch-size", type=int, default=64)
  ap.add_argument("--model", default=None, help="model dir (default: packaged MiniLM)")
  ap.add_argument("--st-python", default="/tmp/refenv/bin/python",
                  help="Python with torch + sentence-transformers ('' to skip)")
  args = ap.parse_args()

  from mscenario.text import load_encoder
  texts = movielens_like(args.n)
  enc = load_encoder(args.model)
  t = time.perf_counter()
  ours_cold = enc.encode(texts, batch_size=args.batch_size, progress=False)
  cold = time.perf_counter() - t
  t = time.perf_counter()
  enc.encode(texts, batch_size=args.batch_size, progress=False)
  warm = time.perf_counter() - t
  tokens = [len(x) for x in enc.tokenize(texts)]
  result = {"texts": args.n, "mean_tokens": float(np.mean(tokens)), "max_tokens": max(tokens),
            "batch_size": args.batch_size, "cpus": os.cpu_count(),
            "ours_cold_per_s": round(args.n / cold, 1), "ours_warm_per_s": round(args.n / warm, 1)}

  if args.st_python and os.path.exists(args.st_python):
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
      path = os.path.join(tmp, "texts.json")
      with open(path, "w") as f:
        json.dump(texts, f)
      script = os.path.join(tmp, "st.py")
      with open(script, "w") as f:
        f.write(ST_SCRIPT)
      proc = subprocess.run([args.st_python, script, path, enc.model_dir, str(args.batch_size)],
                            capture_output=True, text=True, check=True)
    st = json.loads(proc.stdout.strip().splitlines()[-1])
    result.update({"st_warm_per_s": round(args.n / st["seconds"], 1),
                   "torch": st["torch"], "torch_threads": st["threads"]})
    result["speedup_warm"] = round(result["ours_warm_per_s"] / result["st_warm_per_s"], 2)
  del ours_cold
  print(json.dumps(result, indent=2))


if __name__ == "__main__":
  sys.exit(main())
