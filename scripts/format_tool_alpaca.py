#!/usr/bin/env python3
"""ToolAlpaca train data (a JSON list of API records) -> multi-turn tool conversations (the code is chatglm3_finetune/data/converters/tool_alpaca.py; --help lists the options)."""

import sys

from chatglm3_finetune.data.converters.tool_alpaca import main

if __name__ == "__main__":
    sys.exit(main())
