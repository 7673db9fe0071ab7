"""Data in, tokens out: validate a data file and preview one record's ChatGLM3 tokens (the same
sanity check finetune.py prints), without loading a model.

    python preprocess_utils.py --tokenizer DIR --train_format multi-turn --data FILE [--index N]
    python preprocess_utils.py --tokenizer DIR --train_format auto --data FOLDER --split train

The data code itself lives in the package: `records` (read and validate), `chat_format` (the
conversation format), `encoding` (ids and labels), `training_data` (tokenized datasets) and
`collation` (batches). Its main names are importable from here too.
"""

from __future__ import annotations

import argparse
import sys

from chatglm3_finetune.data.collation import DataCollatorForChatGLM  # noqa: F401
from chatglm3_finetune.data.encoding import (  # noqa: F401
    IGNORE_INDEX, TRUNCATION_POLICIES, EncodedRecord, LengthLimits, encode_multi_turn, encode_prompt_response,
    encode_record, length_cap_problem, print_sanity_check, sanity_check_lines,
)
from chatglm3_finetune.data.records import (  # noqa: F401
    INPUT_OUTPUT, MULTI_TURN, TRAIN_FORMATS, DataError, read_records, validate_records, write_jsonl,
)
from chatglm3_finetune.data.formats import load_data
from chatglm3_finetune.format.tokenizer import load_tokenizer
from chatglm3_finetune.data.training_data import (  # noqa: F401
    TruncationReport, caps_text, tokenize_records, truncation_report,
)


def preview(tokenizer, path: str, train_format: str, limits: LengthLimits, index: int = 0,
            split: str | None = None, full: bool = False) -> list[str]:
    """Validates the whole file; returns the sanity check of record `index`, the format the data was
    read as, a summary line and a warning line for each thing the caps cut."""
    data = load_data(path, train_format, split)
    records = data.records
    if not 0 <= index < len(records):
        raise DataError(f"{path}: --index {index} is out of range (the file has {len(records)} records)")
    encoded = [encode_record(tokenizer, record, data.record_format, limits) for _, record in records]
    rows = [e.as_dict() for e in encoded]
    report = truncation_report({key: [row[key] for row in rows] for key in rows[0]},
                               [len(e.input_ids) for e in encoded])
    chosen = encoded[index]
    return (sanity_check_lines(tokenizer, chosen.input_ids, chosen.labels, full) + [data.describe(), report.summary()]
            + [f"warning: {line}" for line in report.warnings(caps_text(limits))])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Validate a data file and preview one record's tokens.")
    parser.add_argument("--tokenizer", required=True, help="folder holding a ChatGLM3 tokenizer.model")
    parser.add_argument("--train_format", required=True, choices=TRAIN_FORMATS)
    parser.add_argument("--data", required=True, help=".json (a list), .jsonl (one record a line), .parquet, or a "
                                                      "folder saved with datasets' save_to_disk")
    parser.add_argument("--split", help="the split of a --data folder that holds several")
    parser.add_argument("--index", type=int, default=0, help="which record to show (default 0)")
    parser.add_argument("--max_seq_length", type=int, default=None, help="multi-turn: cap as in finetune.py")
    parser.add_argument("--max_source_length", type=int, default=None, help="input-output: prompt cap")
    parser.add_argument("--max_target_length", type=int, default=None, help="input-output: response cap")
    parser.add_argument("--full_sanity_check", action="store_true",
                        help="print every token (by default a long record shows its start and end)")
    args = parser.parse_args(argv)
    limits = LengthLimits(args.max_seq_length, args.max_source_length, args.max_target_length)
    problem = length_cap_problem(limits)
    if problem:
        parser.error(problem)
    try:
        tokenizer = load_tokenizer(args.tokenizer)
        lines = preview(tokenizer, args.data, args.train_format, limits, args.index, args.split,
                        args.full_sanity_check)
    except FileNotFoundError as e:
        print(f"error: --tokenizer: {e}", file=sys.stderr)
        return 2
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
