"""P-Tuning v2 on native transformers GLM models.

- `prefix_model`: `PrefixTuningModel`, the frozen base plus a learned key/value prefix per layer;
- `prefix_cache`: `PrefixCache`, the read-only cache that hands each layer its prefix;
- `prefix_checkpoint`: `PrefixSettings`, `save_prefix`, `load_prefix_state` (this toolkit's format
  and the original THUDM one).
"""
