"""Training splits as `datasets`: validated records tokenized in parallel and cached, truncation
counted, records packed into rows when asked."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass

from .data_formats import load_data, record_format_of, settle_record_format
from .encoding import LengthLimits, encode_record
from .records import MULTI_TURN, DataError

logger = logging.getLogger(__name__)


@dataclass
class TruncationReport:
    records: int = 0
    tokens: int = 0
    targets: int = 0
    truncated: int = 0
    lost_targets: int = 0
    lost_stop: int = 0
    no_targets_left: int = 0  # records whose every target a cap removed (always left out)
    dropped: int = 0

    @property
    def kept(self) -> int:
        return self.records - (self.dropped or self.no_targets_left)

    def summary(self) -> str:
        text = (f"{self.records} records, {self.tokens} tokens, {self.targets} supervised tokens, "
                f"{self.truncated} truncated records ({self.lost_targets} lost supervised targets, "
                f"{self.lost_stop} lost the final stop target)")
        if self.dropped:
            text += f", {self.dropped} dropped by --truncation_policy drop"
        elif self.no_targets_left:
            text += f", {self.no_targets_left} left out because no supervised target was left"
        return text


class RecordEncoder:
    """Picklable map function for `datasets`: JSON-string records in, token columns out."""

    def __init__(self, tokenizer, train_format: str, limits: LengthLimits):
        self.tokenizer, self.train_format, self.limits = tokenizer, train_format, limits

    def __call__(self, batch: dict) -> dict:
        rows = [encode_record(self.tokenizer, json.loads(r), self.train_format, self.limits).as_dict()
                for r in batch["record"]]
        return {key: [row[key] for row in rows] for key in rows[0]}


def _cache_key(tokenizer, records_json: list[str], train_format: str, limits: LengthLimits) -> str:
    digest = hashlib.sha256()
    with open(tokenizer.vocab_file, "rb") as f:
        digest.update(f.read())
    digest.update(repr((train_format, limits, _code_fingerprint())).encode())
    for record in records_json:
        digest.update(record.encode("utf-8"))
    return digest.hexdigest()[:24]


def _code_fingerprint() -> str:
    """The source of every module that decides the tokens: a change in any of them re-tokenizes."""
    from . import chat_format, encoding, records, tokenizer

    digest = hashlib.sha256()
    for module in (chat_format, encoding, records, tokenizer):
        with open(module.__file__, "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()


def tokenize_records(tokenizer, records: list[tuple[str, dict]], train_format: str, limits: LengthLimits,
                     num_proc: int | None = None, cache_dir: str | None = None,
                     overwrite_cache: bool = False, truncation_policy: str = "keep"):
    """Validated records -> a `datasets.Dataset` of input_ids/labels, plus a TruncationReport.

    Tokenization runs with `num_proc` workers and is cached under `cache_dir` (keyed by the data,
    the tokenizer, the format, the caps and this file's code); `overwrite_cache` recomputes it.
    """
    import datasets

    records_json = [json.dumps(record, ensure_ascii=False) for _, record in records]
    cache_path = None
    if cache_dir:
        cache_path = os.path.join(cache_dir, "tokenized-" + _cache_key(tokenizer, records_json, train_format, limits))
    if cache_path and os.path.isdir(cache_path) and not overwrite_cache:
        logger.info("Loading tokenized data from cache %s", cache_path)
        dataset = datasets.load_from_disk(cache_path)
    else:
        raw = datasets.Dataset.from_dict({"record": records_json})
        num_proc = num_proc if num_proc and num_proc > 1 and len(records_json) >= 2 * num_proc else None
        dataset = raw.map(RecordEncoder(tokenizer, train_format, limits), batched=True, batch_size=256,
                          num_proc=num_proc, remove_columns=["record"], desc="Tokenizing",
                          new_fingerprint=_cache_key(tokenizer, records_json, train_format, limits)[:16])
        if cache_path:
            dataset.save_to_disk(cache_path)
    report = _truncation_report(dataset)
    if report.lost_targets and truncation_policy == "error":
        first = dataset["lost_targets"].index(True)
        raise DataError(
            f"{records[first][0]}: truncation removed supervised targets ({report.lost_targets} records in all); "
            f"raise the length caps or use --truncation_policy keep|drop"
        )
    if report.lost_targets and truncation_policy == "drop":
        dataset = dataset.filter(lambda lost: not lost, input_columns="lost_targets")
        report.dropped = report.lost_targets
    elif report.no_targets_left:
        # Truncation took every target of these records: they would only cost compute.
        dataset = dataset.filter(lambda targets: targets > 0, input_columns="num_targets")
    return dataset, report


def _truncation_report(dataset) -> TruncationReport:
    columns = dataset.select_columns(["num_targets", "truncated", "lost_targets", "lost_stop"]).to_dict()
    lengths = [len(ids) for ids in dataset["input_ids"]]
    return TruncationReport(
        records=len(dataset), tokens=sum(lengths), targets=sum(columns["num_targets"]),
        truncated=sum(columns["truncated"]), lost_targets=sum(columns["lost_targets"]),
        lost_stop=sum(columns["lost_stop"]),
        no_targets_left=sum(targets == 0 for targets in columns["num_targets"]),
    )


def length_limits(data_args) -> LengthLimits:
    if record_format_of(data_args) == MULTI_TURN:
        return LengthLimits(max_seq_length=data_args.max_seq_length)
    return LengthLimits(max_source_length=data_args.max_source_length, max_target_length=data_args.max_target_length)


def max_sequence_length(data_args) -> int:
    limits = length_limits(data_args)
    return limits.max_seq_length or limits.max_source_length + limits.max_target_length + 1


def read_and_validate(path: str, data_args, max_samples: int | None, split: str | None = None,
                      split_flag: str = "--split") -> list[tuple[str, dict]]:
    """The records of a data file or dataset folder in --train_format, validated and converted to
    this project's records; what they became is recorded on `data_args` (see record_format_of)."""
    data = load_data(path, data_args.train_format, split, split_flag)
    settle_record_format(data_args, data, path)
    logger.info("%s", data.describe())
    return data.records[:max_samples] if max_samples else data.records


def load_split(path, max_samples, tokenizer, data_args, training_args, description: str, split: str | None = None,
               split_flag: str = "--split"):
    """Validated records of one file -> a tokenized Dataset of input_ids/labels (plus a report)."""
    records = read_and_validate(path, data_args, max_samples, split, split_flag)
    with training_args.main_process_first(desc=f"tokenizing {description}"):
        dataset, report = tokenize_records(
            tokenizer, records, record_format_of(data_args), length_limits(data_args),
            num_proc=data_args.preprocessing_num_workers, cache_dir=data_args.cache_dir,
            overwrite_cache=data_args.overwrite_cache, truncation_policy=data_args.truncation_policy)
    logger.info("%s data %s: %s", description, path, report.summary())
    if len(dataset) == 0:
        raise DataError(f"{path}: no records left to use ({report.summary()}); raise the length caps")
    return dataset.select_columns(["input_ids", "labels"]), report


def pack_dataset(dataset, data_args):
    import datasets

    from .packing import pack_features

    rows = pack_features(list(dataset), max_sequence_length(data_args))
    logger.info("Packed %d records into %d rows of at most %d tokens", len(dataset), len(rows),
                max_sequence_length(data_args))
    return datasets.Dataset.from_list(rows)
