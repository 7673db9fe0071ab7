#!/usr/bin/env python3
"""Merges a LoRA adapter into its base model and saves a plain model folder (the code is chatglm3_finetune/model/lora_merge.py; --help lists the options)."""

import sys

from chatglm3_finetune.model.lora_merge import main

if __name__ == "__main__":
    sys.exit(main())
