"""Options of finetune.py: model, data and tuning dataclasses parsed with HfArgumentParser
together with `Seq2SeqTrainingArguments`. One `.json` or `.yaml` file may stand for all flags.

`check_options` validates them before any model or data is loaded, so a wrong flag fails in a
second with a message that says what to do.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

from transformers import HfArgumentParser, Seq2SeqTrainingArguments

from chatglm3_finetune.records import ALPACA, AUTO, MULTI_TURN, OPENAI, SHAREGPT, TRAIN_FORMATS

from chatglm3_finetune.encoding import TRUNCATION_POLICIES

TORCH_DTYPES = ("auto", "float32", "float16", "bfloat16")


class OptionError(ValueError):
    """A wrong or inconsistent command-line option."""


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "folder of a transformers causal LM (e.g. a converted ChatGLM3-6B)"})
    tokenizer_name: str | None = field(default=None, metadata={"help": "tokenizer folder, if not the model folder"})
    torch_dtype: str = field(default="auto", metadata={
        "help": "dtype of the base model: auto (bf16/fp16 for a frozen base on GPU, fp32 otherwise), "
                "float32, float16, bfloat16", "choices": TORCH_DTYPES})
    trust_remote_code: bool = field(default=False, metadata={"help": "allow the model folder's own code (off by default)"})
    attn_implementation: str | None = field(default=None, metadata={"help": "eager, sdpa or flash_attention_2"})
    ptuning_checkpoint: str | None = field(default=None, metadata={
        "help": "continue P-Tuning v2 from this prefix checkpoint (ours or the original format)"})
    pre_seq_len: int | None = field(default=None, metadata={"help": "P-Tuning v2: number of virtual prefix tokens"})
    prefix_projection: bool = field(default=False, metadata={"help": "P-Tuning v2: pass the prefix through a 2-layer MLP"})
    prefix_hidden_size: int | None = field(default=None, metadata={"help": "P-Tuning v2: MLP width (default: model hidden size)"})
    prefix_dropout: float = field(default=0.1, metadata={"help": "P-Tuning v2: dropout on the prefix in training"})
    quantization_bit: int | None = field(default=None, metadata={"help": "4 or 8: quantize the frozen base (P-Tuning, LoRA)"})
    lora_rank: int | None = field(default=None, metadata={"help": "LoRA: rank of the adapters (enables LoRA)"})
    lora_alpha: float = field(default=32.0, metadata={"help": "LoRA: scaling alpha"})
    lora_dropout: float = field(default=0.1, metadata={"help": "LoRA: dropout"})
    lora_target: str = field(default="q_proj,k_proj,v_proj,o_proj", metadata={
        "help": "LoRA: comma-separated module names to adapt (e.g. q_proj,v_proj or all-linear)"})

    @property
    def tuning_method(self) -> str:
        if self.pre_seq_len is not None or self.ptuning_checkpoint:
            return "ptuning"
        if self.lora_rank is not None:
            return "lora"
        return "full"


@dataclass
class DataArguments:
    train_format: str = field(metadata={
        "help": "multi-turn (conversations, tools), input-output (prompt, response), openai (messages), sharegpt "
                "(conversations of from/value), alpaca (instruction, input, output), or auto: recognised from the "
                "first record", "choices": TRAIN_FORMATS})
    train_file: str | None = field(default=None, metadata={
        "help": "training data: .jsonl, .json, .parquet, or a folder saved with datasets' save_to_disk"})
    validation_file: str | None = field(default=None, metadata={"help": "data for --do_eval (as --train_file)"})
    test_file: str | None = field(default=None, metadata={"help": "data for --do_predict (as --train_file)"})
    train_split: str | None = field(default=None, metadata={"help": "the split of a --train_file DatasetDict folder"})
    validation_split: str | None = field(default=None, metadata={"help": "the split of a --validation_file folder"})
    test_split: str | None = field(default=None, metadata={"help": "the split of a --test_file folder"})
    max_seq_length: int = field(default=2048, metadata={"help": "multi-turn: longest sequence kept, in tokens"})
    max_source_length: int = field(default=1024, metadata={"help": "input-output: prompt cap, with [gMASK] sop"})
    max_target_length: int = field(default=128, metadata={"help": "input-output: response cap, before the eos"})
    truncation_policy: str = field(default="keep", metadata={
        "help": "when a length cap removes supervised targets: keep (train, count, report), drop the record, "
                "or error", "choices": TRUNCATION_POLICIES})
    pad_to_max_length: bool = field(default=False, metadata={
        "help": "pad every batch to the length cap, as the reference did (slow; for comparisons)"})
    pad_to_multiple_of: int | None = field(default=None, metadata={"help": "round padded lengths up (e.g. 8)"})
    packing: bool = field(default=False, metadata={
        "help": "pack several records per row, each attending only to itself (no padding waste)"})
    loss_on_targets_only: bool = field(default=True, metadata={
        "help": "compute the output layer and loss only at supervised positions (same loss, less time and "
                "memory); --no_loss_on_targets_only computes logits everywhere, as the reference did"})
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "processes for tokenization"})
    preprocessing_cache_dir: str | None = field(default=None, metadata={
        "help": "where tokenized data is cached (default: ~/.cache/chatglm3_finetune)"})
    overwrite_cache: bool = field(default=False, metadata={"help": "re-tokenize even when a cached copy exists"})
    max_train_samples: int | None = field(default=None, metadata={"help": "use only the first N training records"})
    max_eval_samples: int | None = field(default=None, metadata={"help": "use only the first N validation records"})
    max_predict_samples: int | None = field(default=None, metadata={"help": "use only the first N test records"})

    # multi-turn or input-output: what the data became, set when it is read (data_formats.record_format_of)
    resolved_format: str | None = field(default=None, init=False)

    @property
    def cache_dir(self) -> str:
        return self.preprocessing_cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "chatglm3_finetune")


def parse_args(argv: list[str] | None = None):
    """(model_args, data_args, training_args) from flags, or from one .json/.yaml file."""
    argv = sys.argv[1:] if argv is None else argv
    parser = HfArgumentParser((ModelArguments, DataArguments, Seq2SeqTrainingArguments))
    if len(argv) == 1 and argv[0].endswith(".json"):
        return parser.parse_json_file(os.path.abspath(argv[0]))
    if len(argv) == 1 and argv[0].endswith((".yaml", ".yml")):
        return parser.parse_yaml_file(os.path.abspath(argv[0]))
    return parser.parse_args_into_dataclasses(args=argv)


def check_options(model_args: ModelArguments, data_args: DataArguments, training_args) -> None:
    """Everything that can be checked before loading a model; raises OptionError."""
    if data_args.train_format not in TRAIN_FORMATS:
        raise OptionError(f"--train_format {data_args.train_format!r} is not one of {', '.join(TRAIN_FORMATS)}")
    if training_args.do_train and not data_args.train_file:
        raise OptionError("--do_train needs --train_file")
    if training_args.do_eval and not data_args.validation_file:
        raise OptionError("--do_eval needs --validation_file")
    if training_args.do_predict and not data_args.test_file:
        raise OptionError("--do_predict needs --test_file")
    for name in ("train_file", "validation_file", "test_file"):
        path = getattr(data_args, name)
        if path and not os.path.exists(path):
            raise OptionError(f"--{name} {path}: no such file")
    if not os.path.isdir(model_args.model_name_or_path):
        raise OptionError(f"--model_name_or_path {model_args.model_name_or_path}: no such folder "
                          f"(models load from local folders only; convert an original ChatGLM3 folder with "
                          f"scripts/convert_chatglm3.py)")
    if model_args.quantization_bit not in (None, 4, 8):
        raise OptionError(f"--quantization_bit must be 4 or 8, got {model_args.quantization_bit}")
    if model_args.quantization_bit and model_args.tuning_method == "full":
        raise OptionError("--quantization_bit needs a frozen base: use it with P-Tuning (--pre_seq_len) or LoRA (--lora_rank)")
    if model_args.lora_rank is not None and model_args.tuning_method == "ptuning":
        raise OptionError("choose one of P-Tuning v2 (--pre_seq_len/--ptuning_checkpoint) and LoRA (--lora_rank)")
    if model_args.pre_seq_len is not None and model_args.pre_seq_len < 1:
        raise OptionError(f"--pre_seq_len must be at least 1, got {model_args.pre_seq_len}")
    if model_args.ptuning_checkpoint:
        _check_ptuning_checkpoint(model_args)
    if data_args.packing and data_args.pad_to_max_length:
        raise OptionError("--packing and --pad_to_max_length exclude each other")
    if data_args.packing and model_args.attn_implementation == "eager":
        raise OptionError("--packing needs sdpa (the default) or flash_attention_2 attention: eager attention "
                          "adds the mask, and packed rows carry a boolean block-diagonal one")
    limits = (data_args.max_seq_length,) if data_args.train_format in (MULTI_TURN, OPENAI, SHAREGPT) else (
        data_args.max_source_length, data_args.max_target_length)
    if data_args.train_format in (ALPACA, AUTO):  # the data decides which caps apply
        limits = (data_args.max_seq_length, data_args.max_source_length, data_args.max_target_length)
    if any(limit is not None and limit < 3 for limit in limits):
        raise OptionError(f"length caps must be at least 3 tokens, got {limits}")


def _check_ptuning_checkpoint(model_args: ModelArguments) -> None:
    from chatglm3_finetune.prefix_tuning import read_prefix_settings

    try:
        settings = read_prefix_settings(model_args.ptuning_checkpoint)
    except (FileNotFoundError, ValueError) as e:
        raise OptionError(f"--ptuning_checkpoint {model_args.ptuning_checkpoint}: {e}") from None
    if model_args.pre_seq_len is not None and model_args.pre_seq_len != settings["pre_seq_len"]:
        raise OptionError(
            f"--pre_seq_len {model_args.pre_seq_len} disagrees with the checkpoint {model_args.ptuning_checkpoint}, "
            f"which was trained with pre_seq_len {settings['pre_seq_len']}: drop the flag (it is read from the checkpoint)"
        )
