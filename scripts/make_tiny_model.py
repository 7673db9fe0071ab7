#!/usr/bin/env python3
"""Builds the demo's tiny ChatGLM3-architecture model and its tokenizer, both trained on the samples (the code is chatglm3_finetune/model/make_tiny_model.py; --help lists the options)."""

import sys

from chatglm3_finetune.model.make_tiny_model import main

if __name__ == "__main__":
    sys.exit(main())
