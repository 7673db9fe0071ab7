"""Training splits as `datasets`: validated records tokenized in parallel and cached, truncation
counted, records packed into rows when asked."""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass

from .formats import FIXED_RECORD_FORMAT, load_data, record_format_of, settle_record_format
from .encoding import LengthLimits, encode_record
from .records import MULTI_TURN, DataError
from .splitting import SplitError, hold_out

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

    def warnings(self, caps: str) -> list[str]:
        """What the length caps (`caps` names them, e.g. "--max_seq_length 2048") cost, one line each."""
        lines = []
        if self.truncated:
            stop = (f", {self.lost_stop} lost the final stop target, which teaches the model to end its answer"
                    if self.lost_stop else "")
            lines.append(f"{self.truncated} of {self.records} records were cut by {caps} ({self.lost_targets} lost "
                         f"supervised targets{stop})")
        if self.dropped:
            lines.append(f"{self.dropped} of {self.records} records left out by --truncation_policy drop")
        elif self.no_targets_left:
            lines.append(f"{self.no_targets_left} of {self.records} records left out because the cut removed "
                         f"every supervised target; raise {caps.split()[0]} to use them")
        return lines

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


# Raise when the layout of the cached columns changes: older caches are then simply not found.
CACHE_FORMAT_VERSION = 2


def _cache_key(tokenizer, records_json: list[str], train_format: str, limits: LengthLimits) -> str:
    """Everything that decides the tokens: format version, tokenizer files and code, options, data."""
    digest = hashlib.sha256()
    tokenizer_folder = os.path.dirname(os.path.abspath(tokenizer.vocab_file))
    for path in (tokenizer.vocab_file, os.path.join(tokenizer_folder, "tokenizer_config.json")):
        if os.path.isfile(path):
            with open(path, "rb") as f:
                digest.update(f.read())
    digest.update(repr((CACHE_FORMAT_VERSION, train_format, limits, _code_fingerprint(tokenizer))).encode())
    for record in records_json:
        digest.update(record.encode("utf-8"))
    return digest.hexdigest()[:24]


def _code_fingerprint(tokenizer) -> str:
    """The source of every module that decides the tokens: a change in any of them re-tokenizes."""
    import sys

    from ..format import chat_format
    from . import encoding, records

    modules = (chat_format, encoding, records, sys.modules[__name__], sys.modules[type(tokenizer).__module__])
    digest = hashlib.sha256()
    for module in modules:
        with open(module.__file__, "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()


def _load_cached(cache_path: str):
    """The cached dataset, or None (with a warning) when the folder is incomplete or unreadable."""
    import datasets

    try:
        return datasets.load_from_disk(cache_path)
    except Exception as e:  # any damage (missing files, truncated arrow) means: rebuild
        logger.warning("The tokenized-data cache %s is incomplete or unreadable (%s: %s); rebuilding it",
                       cache_path, type(e).__name__, e)
        shutil.rmtree(cache_path, ignore_errors=True)
        return None


def _save_cached(dataset, cache_path: str) -> None:
    """Written aside, then renamed into place: a kill leaves no cache, never a partial one."""
    for stale in glob.glob(glob.escape(cache_path) + ".partial-*"):  # left by a killed run
        if not _process_alive(int(stale.rsplit("-", 1)[1])):
            shutil.rmtree(stale, ignore_errors=True)
    aside = f"{cache_path}.partial-{os.getpid()}"
    dataset.save_to_disk(aside)
    try:
        os.replace(aside, cache_path)
    except OSError:  # another process renamed its identical copy first
        shutil.rmtree(aside, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def tokenize_records(tokenizer, records: list[tuple[str, dict]], train_format: str, limits: LengthLimits,
                     num_proc: int | None = None, cache_dir: str | None = None,
                     overwrite_cache: bool = False, truncation_policy: str = "keep"):
    """Validated records -> a `datasets.Dataset` of input_ids/labels, plus a TruncationReport.

    Tokenization runs with `num_proc` workers and is cached under `cache_dir` (keyed by the data,
    the tokenizer, the format, the caps and the code that decides tokens); `overwrite_cache`
    recomputes it.
    """
    import datasets

    records_json = [json.dumps(record, ensure_ascii=False) for _, record in records]
    key = _cache_key(tokenizer, records_json, train_format, limits)
    cache_path = os.path.join(cache_dir, "tokenized-" + key) if cache_dir else None
    dataset = None
    if cache_path and os.path.isdir(cache_path) and not overwrite_cache:
        logger.info("Loading tokenized data from cache %s", cache_path)
        dataset = _load_cached(cache_path)
    if dataset is None:
        raw = datasets.Dataset.from_dict({"record": records_json})
        num_proc = num_proc if num_proc and num_proc > 1 and len(records_json) >= 2 * num_proc else None
        dataset = raw.map(RecordEncoder(tokenizer, train_format, limits), batched=True, batch_size=256,
                          num_proc=num_proc, remove_columns=["record"], desc="Tokenizing",
                          new_fingerprint=key[:16])
        if cache_path:
            _save_cached(dataset, cache_path)
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
    return truncation_report(columns, [len(ids) for ids in dataset["input_ids"]])


def truncation_report(columns: dict[str, list], lengths: list[int]) -> TruncationReport:
    """The report of encoded records given as columns (EncodedRecord.as_dict keys) and their lengths."""
    return TruncationReport(
        records=len(lengths), tokens=sum(lengths), targets=sum(columns["num_targets"]),
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


def caps_text(limits: LengthLimits) -> str:
    """The caps set, as flags: e.g. `--max_seq_length 2048`."""
    return " / ".join(f"--{name} {value}" for name, value in vars(limits).items() if value is not None)


def caps_to_check(data_args) -> LengthLimits:
    """The caps that apply; all three while the data has not said which (--train_format auto, alpaca)."""
    if getattr(data_args, "resolved_format", None) or data_args.train_format in FIXED_RECORD_FORMAT:
        return length_limits(data_args)
    return LengthLimits(data_args.max_seq_length, data_args.max_source_length, data_args.max_target_length)


def read_and_validate(path: str, data_args, max_samples: int | None, split: str | None = None,
                      split_flag: str = "--train_split") -> list[tuple[str, dict]]:
    """The records of a data file or dataset folder in --train_format, validated and converted to
    this project's records; what they became is recorded on `data_args` (see record_format_of)."""
    data = load_data(path, data_args.train_format, split, split_flag)
    settle_record_format(data_args, data, path)
    logger.info("%s", data.describe())
    return data.records[:max_samples] if max_samples else data.records


def read_split_records(data_args, training_args) -> dict[str, tuple[str, list]]:
    """{"train" | "eval" | "test": (source, validated records)} for the splits this run uses.

    With --val_size the evaluation records are drawn (with --seed) from --train_file and are not
    trained on. --max_train_samples / --max_eval_samples / --max_predict_samples then take the
    first N of each split.
    """
    splits = {}
    if training_args.do_train or data_args.val_size:
        train = read_and_validate(data_args.train_file, data_args, None, data_args.train_split, "--train_split")
        if data_args.val_size:
            try:
                train, held_out = hold_out(train, data_args.val_size, training_args.seed)
            except SplitError as e:
                raise DataError(f"{data_args.train_file}: --val_size {e}") from None
            logger.info("--val_size %g: %d of the %d records of %s held out for evaluation (--seed %d)",
                        data_args.val_size, len(held_out), len(train) + len(held_out), data_args.train_file,
                        training_args.seed)
            if training_args.do_eval:
                splits["eval"] = (f"{data_args.train_file} (held out by --val_size)", held_out)
        if training_args.do_train:
            splits["train"] = (data_args.train_file, train)
    if training_args.do_eval and not data_args.val_size:
        splits["eval"] = (data_args.validation_file, read_and_validate(
            data_args.validation_file, data_args, None, data_args.validation_split, "--validation_split"))
    if training_args.do_predict:
        splits["test"] = (data_args.test_file, read_and_validate(
            data_args.test_file, data_args, None, data_args.test_split, "--test_split"))
    caps = {"train": data_args.max_train_samples, "eval": data_args.max_eval_samples,
            "test": data_args.max_predict_samples}
    return {name: (splits[name][0], splits[name][1][:caps[name]] if caps[name] else splits[name][1])
            for name in ("train", "eval", "test") if name in splits}


def load_split(path, max_samples, tokenizer, data_args, training_args, description: str, split: str | None = None,
               split_flag: str = "--train_split", records=None):
    """Validated records of one file (or `records` already read from `path`) -> a tokenized Dataset
    of input_ids/labels, plus its TruncationReport; what the caps cut is logged as warnings."""
    if records is None:
        records = read_and_validate(path, data_args, max_samples, split, split_flag)
    with training_args.main_process_first(desc=f"tokenizing {description}"):
        dataset, report = tokenize_records(
            tokenizer, records, record_format_of(data_args), length_limits(data_args),
            num_proc=data_args.preprocessing_num_workers, cache_dir=data_args.cache_dir,
            overwrite_cache=data_args.overwrite_cache, truncation_policy=data_args.truncation_policy)
    logger.info("%s data %s: %s", description, path, report.summary())
    for warning in report.warnings(caps_text(length_limits(data_args))):
        logger.warning("%s data %s: %s", description, path, warning)
    if len(dataset) == 0:
        raise DataError(f"{path}: no records left to use ({report.summary()}); raise the length caps")
    return dataset.select_columns(["input_ids", "labels"]), report


DEFAULT_PACKING_ROW_LENGTH = 2048  # beyond it rows only grow the step, attention is per record anyway


def packing_row_length(data_args, longest_record: int) -> int:
    """--packing_row_length, or the length cap held to 2048 (and never below the longest record)."""
    if data_args.packing_row_length:
        return data_args.packing_row_length
    return max(min(max_sequence_length(data_args), DEFAULT_PACKING_ROW_LENGTH), longest_record)


def pack_dataset(dataset, data_args):
    import datasets

    from .packing import pack_features

    features = dataset.to_list()
    row_length = packing_row_length(data_args, max(len(f["input_ids"]) for f in features))
    try:
        rows = pack_features(features, row_length)
    except ValueError as e:
        raise DataError(f"--packing_row_length {row_length}: {e}") from None
    logger.info("Packed %d records into %d rows of at most %d tokens", len(dataset), len(rows), row_length)
    return datasets.Dataset.from_list(rows)
