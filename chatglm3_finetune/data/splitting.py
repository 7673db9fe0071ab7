"""Seeded splits of a data set: the evaluation records `--val_size` holds out of a training file,
and the train/dev/test files the converters write with `--split`."""

from __future__ import annotations

import argparse
import os
import random

from .paths import file_problem

SPLIT_NAMES = ("train", "dev", "test")


class SplitError(ValueError):
    """A split that cannot be made; the message starts with the offending value."""


def check_val_size(val_size: float) -> None:
    """A count (a whole number, at least 1) or a fraction strictly between 0 and 1."""
    if val_size <= 0 or (val_size >= 1 and val_size != int(val_size)):
        raise SplitError(f"{val_size:g}: give a count of records (e.g. 200) or a fraction between 0 and 1 "
                         f"(e.g. 0.05)")


def held_out_count(total: int, val_size: float) -> int:
    """How many of `total` records `val_size` holds out; at least one stays on each side."""
    check_val_size(val_size)
    count = int(val_size) if val_size >= 1 else round(total * val_size)
    if count < 1 or count >= total:
        raise SplitError(f"{val_size:g} of {total} records holds out {count}: at least one record must be held "
                         f"out and one left for training")
    return count


def hold_out(records: list, val_size: float, seed: int) -> tuple[list, list]:
    """(kept, held_out): `val_size` records drawn at random with `seed`; each part in file order."""
    chosen = set(random.Random(seed).sample(range(len(records)), held_out_count(len(records), val_size)))
    return ([r for i, r in enumerate(records) if i not in chosen],
            [r for i, r in enumerate(records) if i in chosen])


def parse_split(text: str) -> tuple[float, float, float]:
    """`--split 0.8,0.1,0.1` -> the train, dev and test fractions (non-negative, summing to 1)."""
    try:
        fractions = tuple(float(part) for part in text.split(","))
    except ValueError:
        fractions = ()
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6 or not fractions[0]:
        raise SplitError(f"{text}: give three fractions train,dev,test that add up to 1, e.g. 0.8,0.1,0.1")
    return fractions


def split_rows(rows: list, fractions: tuple[float, float, float], seed: int) -> dict[str, list]:
    """{"train", "dev", "test": rows}: a seeded shuffle cut by the fractions (a part whose fraction
    is 0 is left out); raises SplitError when a wanted part would be empty."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    sizes = {name: round(len(rows) * fraction) for name, fraction in zip(SPLIT_NAMES[1:], fractions[1:])}
    sizes["train"] = len(rows) - sum(sizes.values())
    parts, start = {}, 0
    for name, fraction in zip(SPLIT_NAMES, fractions):
        if not fraction:
            continue
        if sizes[name] < 1:
            raise SplitError(f"{','.join(f'{f:g}' for f in fractions)} of {len(rows)} records leaves the {name} "
                             f"part empty: use larger fractions or more data")
        parts[name] = [rows[i] for i in sorted(order[start:start + sizes[name]])]
        start += sizes[name]
    return parts


def split_path(output: str, name: str) -> str:
    """`formatted_data/advertise_gen.jsonl` -> `formatted_data/advertise_gen_test.jsonl` for "test"."""
    stem, extension = os.path.splitext(output)
    return f"{stem}_{name}{extension or '.jsonl'}"


def add_split_options(parser, default_output: str) -> None:
    """The converters' --split / --seed flags."""
    parser.add_argument("--split", default=None, metavar="TRAIN,DEV,TEST",
                        help=f"write a seeded train/dev/test split instead of one file, e.g. 0.8,0.1,0.1 "
                             f"(OUTPUT_train.jsonl, OUTPUT_dev.jsonl, OUTPUT_test.jsonl; with the default "
                             f"--output: {split_path(default_output, 'test')} and so on)")
    parser.add_argument("--seed", type=int, default=42, help="shuffle seed of --split (default 42)")


def parse_split_or_exit(parser, text: str) -> tuple[float, float, float]:
    try:
        return parse_split(text)
    except SplitError as error:
        parser.error(f"--split {error}")


def converter_arguments(description: str, path_help: str, default_output: str,
                        argv: list[str] | None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    """The converters' shared command line (--path, --output, --split, --seed), checked before any reading."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--path", required=True, help=path_help)
    parser.add_argument("--output", default=default_output)
    add_split_options(parser, default_output)
    args = parser.parse_args(argv)
    if args.split:
        parse_split_or_exit(parser, args.split)
    problem = file_problem(args.path)
    if problem:
        parser.exit(2, f"error: --path {problem}\n")
    return parser, args


def write_converted(parser, args, rows: list[dict]) -> list[str]:
    """Writes the rows to --output, or its split files with --split; returns one line per file written."""
    from .records import write_jsonl

    if not args.split:
        write_jsonl(rows, args.output)
        return [f"{len(rows)} records -> {args.output}"]
    try:
        parts = split_rows(rows, parse_split_or_exit(parser, args.split), args.seed)
    except SplitError as error:
        parser.error(f"--split {error}")
    lines = []
    for name, part in parts.items():
        write_jsonl(part, split_path(args.output, name))
        lines.append(f"{name}: {len(part)} records -> {split_path(args.output, name)}")
    return lines
