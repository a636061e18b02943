"""Language-model text features: a Flax BERT sentence encoder and cached embedding tables."""
from mscenario.text.encoder import TextEncoder, default_model_dir, load_encoder

__all__ = ["TextEncoder", "default_model_dir", "load_encoder"]
from mscenario.text.tables import (build_item_texts, build_scenario_texts, build_user_texts,
                                   encode_for_config, encode_table, format_text,
                                   load_text_tables)

__all__ += ["build_item_texts", "build_scenario_texts", "build_user_texts", "encode_for_config",
            "encode_table", "format_text", "load_text_tables"]
