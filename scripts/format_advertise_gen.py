#!/usr/bin/env python3
"""AdvertiseGen JSON lines {"content", "summary"} -> prompt/response JSON lines (the code is chatglm3_finetune/data/converters/advertise_gen.py; --help lists the options)."""

import sys

from chatglm3_finetune.data.converters.advertise_gen import main

if __name__ == "__main__":
    sys.exit(main())
