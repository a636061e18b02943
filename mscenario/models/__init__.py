"""Multi-scenario click models (Flax Linen): embedding collection, layers, registry.

Every model maps the batch dict of `mscenario.data.schema` to logits [B] float32:
  variables = model.init({'params': k}, batch, train=False)
  logits, updates = model.apply(variables, batch, train=True, rngs={'dropout': k},
                                mutable=['batch_stats'])
The stacked embedding table is params['embedding']['table'] (logical axes vocab, embed).
"""
from mscenario.models.embedding import EmbeddingCollection, lookup, model_input
from mscenario.models.layers import MLP, select_scenario
from mscenario.models.registry import available_models, build_model, register
from mscenario.models import mmoe, ple, seed, sharedbottom, star  # noqa: F401  (registers)
from mscenario.models import adasparse, m2m, m3oe, pepnet, sarnet  # noqa: F401  (registers)

__all__ = [
    "EmbeddingCollection", "MLP", "available_models", "build_model", "lookup", "model_input",
    "register", "select_scenario",
]
