"""Options of finetune.py: model, data and tuning dataclasses parsed with HfArgumentParser
together with `Seq2SeqTrainingArguments` (as `TrainingArguments`). One `.json` or `.yaml` file may stand for all flags.

`check_options` validates them before any model or data is loaded, so a wrong flag fails in a
second with a message that says what to do.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import sys
from dataclasses import dataclass, field

import torch
from transformers import HfArgumentParser, Seq2SeqTrainingArguments

from chatglm3_finetune.data import strict_json
from chatglm3_finetune.did_you_mean import did_you_mean
from chatglm3_finetune.data.formats import FIXED_RECORD_FORMAT
from chatglm3_finetune.data.paths import data_source_problem, file_problem
from chatglm3_finetune.data.encoding import TRUNCATION_POLICIES, length_cap_problem
from chatglm3_finetune.data.records import TRAIN_FORMATS
from chatglm3_finetune.data.splitting import SplitError, check_val_size
from chatglm3_finetune.data.training_data import caps_to_check, length_limits, max_sequence_length
from chatglm3_finetune.model.loading import DTYPES, deepspeed_dtype, resolve_dtype

from chatglm3_finetune.train.supervised_loss import DEFAULT_CHUNK_SIZE
TORCH_DTYPES = ("auto", *DTYPES)
PACKING_ATTENTION = (None, "sdpa", "packed_sdpa", "flash_attention_2")


class OptionError(ValueError):
    """A wrong or inconsistent command-line option."""


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "folder of a transformers causal LM (e.g. a converted ChatGLM3-6B)"})
    tokenizer_name: str | None = field(default=None, metadata={"help": "tokenizer folder, if not the model folder"})
    torch_dtype: str = field(default="auto", metadata={
        "help": "dtype the model is loaded in: auto (a frozen base on GPU: bf16, fp16 where bf16 is missing; "
                "full fine-tuning under DeepSpeed: its bf16/fp16; else fp32), float32, float16, bfloat16",
        "choices": TORCH_DTYPES})
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
        "help": "pack several records per row, each attending only to itself (no padding waste; attention "
                "per record: packed_sdpa, or flash_attention_2's variable-length kernel when asked for)"})
    packing_row_length: int | None = field(default=None, metadata={
        "help": "--packing: tokens per packed row (default: the length cap, at most 2048; at least the "
                "longest record)"})
    loss_chunk_size: int = field(default=DEFAULT_CHUNK_SIZE, metadata={
        "help": "supervised positions per output-layer call of the targets-only loss; batches with more "
                "targets recompute each chunk's logits in the backward (less memory, more time)"})
    loss_on_targets_only: bool = field(default=True, metadata={
        "help": "compute the output layer and loss only at supervised positions (same loss, less time and "
                "memory); --no_loss_on_targets_only computes logits everywhere, as the reference did"})
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "processes for tokenization"})
    preprocessing_cache_dir: str | None = field(default=None, metadata={
        "help": "where tokenized data is cached (default: ~/.cache/chatglm3_finetune)"})
    overwrite_cache: bool = field(default=False, metadata={"help": "re-tokenize even when a cached copy exists"})
    val_size: float | None = field(default=None, metadata={
        "help": "hold out part of --train_file for evaluation: a count (e.g. 200) or a fraction in (0, 1) "
                "(e.g. 0.05), drawn with --seed; --do_eval then evaluates on it (instead of --validation_file)"})
    allow_longer_than_model: bool = field(default=False, metadata={
        "help": "accept length caps beyond the model's max_position_embeddings (positions it never saw)"})
    full_sanity_check: bool = field(default=False, metadata={
        "help": "print every token of the sanity check (by default a long record shows its start and end)"})
    max_train_samples: int | None = field(default=None, metadata={"help": "use only the first N training records"})
    max_eval_samples: int | None = field(default=None, metadata={"help": "use only the first N validation records"})
    max_predict_samples: int | None = field(default=None, metadata={"help": "use only the first N test records"})

    # multi-turn or input-output: what the data became, set when it is read (formats.record_format_of)
    resolved_format: str | None = field(default=None, init=False)

    @property
    def cache_dir(self) -> str:
        return self.preprocessing_cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "chatglm3_finetune")


TOKEN_COUNTING_VALUES = {"true": "all", "false": "no", "all": "all", "non_padding": "non_padding", "no": "no"}


@dataclass
class TrainingArguments(Seq2SeqTrainingArguments):
    """Seq2SeqTrainingArguments plus what keeps a run safe (README: "When things go wrong"), and token
    counting on by default with its values accepted on the command line (README: "6. Performance")."""

    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "start over: remove the previous run's checkpoints and records from --output_dir instead of "
                "resuming from them"})
    allow_output_near_inputs: bool = field(default=False, metadata={
        "help": "accept an --output_dir that is, contains or sits inside the model, tokenizer or data (refused by "
                "default: a run could overwrite its own inputs)"})
    nan_patience: int = field(default=0, metadata={
        "help": "skip up to N optimizer steps in a row with a non-finite loss or gradient norm before stopping "
                "as diverged (default 0: stop at the first; not with DeepSpeed or fp16)"})
    save_every_minutes: float = field(default=0, metadata={
        "help": "also save a checkpoint when this many minutes passed since the last one (0: off)"})
    include_num_input_tokens_seen: str = field(default="non_padding", metadata={
        "help": "num_input_tokens_seen (and train_tokens_per_second) counts: non_padding (default: real tokens "
                "in every batch layout, packed rows included; never the P-Tuning prefix), all (every position, "
                "padding included), no; true/false mean all/no", "choices": sorted(TOKEN_COUNTING_VALUES)})

    plan: bool = field(default=False, metadata={
        "help": "print the memory and time plan of this run (peak GPU memory and its parts, time per step and run, "
                "host memory, disk, what to change to fit) and exit, without loading the weights; works without a GPU"})
    plan_json: str | None = field(default=None, metadata={"help": "write the plan as JSON to this file (implies --plan)"})
    gpu_memory: str | None = field(default=None, metadata={
        "help": "plan for a GPU of this memory (e.g. 24GB, 2^30 bytes per GB) instead of the one visible; on a GPU "
                "run, check the plan against it"})
    plan_num_gpus: int | None = field(default=None, metadata={
        "help": "--plan: processes (GPUs) per node of the planned run (default: this launch's, 1 without torchrun)"})
    plan_num_nodes: int | None = field(default=None, metadata={"help": "--plan: nodes of the planned run (default 1)"})
    ignore_memory_plan: bool = field(default=False, metadata={
        "help": "start a GPU run even when its memory plan is clearly over the GPU's memory (by default it stops "
                "before loading the model and prints what to change)"})

    def __post_init__(self):
        value = self.include_num_input_tokens_seen
        value = str(value).lower() if isinstance(value, bool) else value
        if value not in TOKEN_COUNTING_VALUES:
            raise ValueError(f"--include_num_input_tokens_seen {value!r} is not one of {', '.join(TOKEN_COUNTING_VALUES)}")
        self.include_num_input_tokens_seen = TOKEN_COUNTING_VALUES[value]
        super().__post_init__()


def parse_args(argv: list[str] | None = None, plan: bool = False):
    """(model_args, data_args, training_args) from flags, or from one .json/.yaml file; with `plan` (or
    --plan / --plan_json among them) built for planning (`parse_for_plan`).

    Raises OptionError for a missing or broken options file, an unknown key (with the closest valid
    option), a broken --deepspeed config and values the option classes reject.
    """
    argv = sys.argv[1:] if argv is None else argv
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    if len(argv) == 1 and argv[0].endswith((".json", ".yaml", ".yml")):
        path = argv[0]
        options = read_options_file(path)
        check_option_names(options, option_names(parser), path)
        options = numbers_from_text(options, parser, path)
        check_deepspeed_config(options.get("deepspeed"))
        if plan or options.get("plan") or options.get("plan_json"):
            return _build(lambda: parse_for_plan(parser, options), f"{path}: ")
        return _build(lambda: parser.parse_dict(options), f"{path}: ")
    namespace, _ = parser.parse_known_args(args=argv)
    check_deepspeed_config(getattr(namespace, "deepspeed", None))
    if plan or namespace.plan or namespace.plan_json:
        return _build(lambda: parse_for_plan(parser, vars(parser.parse_args(argv))), "")
    return _build(lambda: parser.parse_args_into_dataclasses(args=argv), "")


# What TrainingArguments checks against the machine it runs on (bf16 needs a GPU, --deepspeed starts
# its distributed setup): a plan is made where the run will not be, so these are set after the checks.
MACHINE_BOUND_OPTIONS = ("bf16", "fp16", "deepspeed", "use_cpu")


def parse_for_plan(parser: HfArgumentParser, options: dict):
    """The option classes for --plan: built as on a CPU without mixed precision or DeepSpeed (so no
    GPU is needed), then given the command's own values of those options back."""
    options = dict(options)
    kept = {name: options.pop(name) for name in MACHINE_BOUND_OPTIONS if name in options}
    model_args, data_args, training_args = parser.parse_dict({**options, "use_cpu": True})
    for name in MACHINE_BOUND_OPTIONS:
        setattr(training_args, name, kept.get(name, False if name != "deepspeed" else None))
    training_args.plan = True
    return model_args, data_args, training_args


def _build(parse, where: str):
    # The option classes check their own values in __post_init__ (TrainingArguments raises
    # ValueError for inconsistent flags): a user mistake, reported without a traceback.
    try:
        return parse()
    except (ValueError, TypeError) as e:
        raise OptionError(f"{where}{e}") from None


def option_names(parser: HfArgumentParser) -> list[str]:
    return [f.name for dtype in parser.dataclass_types for f in dataclasses.fields(dtype) if f.init]


def read_options_file(path: str) -> dict:
    """The options in a .json or .yaml file; OptionError naming file:line:column for a syntax error."""
    data = read_json_or_yaml(path, "options file")
    if not isinstance(data, dict):
        raise OptionError(f"{path}: an options file must hold one mapping of option names to values "
                          f"(e.g. {{\"output_dir\": \"output/run\"}}), found {type(data).__name__}")
    return data


def read_json_or_yaml(path: str, what: str):
    """JSON (a .json file) or YAML; OptionError saying `what` is missing, or where its syntax
    breaks. A key given twice is refused (both readers would keep the last one silently)."""
    text = _read_file(path, what)
    if path.endswith(".json"):
        return _parse_json(text, path, what)
    import yaml

    _refuse_yaml_line_breaks(text, path)
    try:
        return yaml.load(text, Loader=_unique_keys_yaml_loader())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else path
        raise OptionError(f"{where}: invalid YAML in the {what}: {getattr(e, 'problem', None) or e}") from None


def _unique_keys_yaml_loader():
    """yaml.SafeLoader that refuses a mapping holding one key twice, at the second one."""
    import yaml

    class UniqueKeysLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                try:
                    repeated = key in seen
                    seen.add(key)
                except TypeError:  # an unhashable key: SafeLoader says what is wrong with it
                    continue
                if repeated:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"the key {key!r} appears twice in one mapping (a YAML reader keeps only the "
                                    f"last value); keep one", key_node.start_mark)
            return super().construct_mapping(node, deep)

    return UniqueKeysLoader


_YAML_LINE_BREAKS = {"\x85": "U+0085 NEXT LINE", "\u2028": "U+2028 LINE SEPARATOR",
                     "\u2029": "U+2029 PARAGRAPH SEPARATOR"}


def _refuse_yaml_line_breaks(text: str, path: str) -> None:
    """YAML reads U+0085, U+2028 and U+2029 as line breaks where editors (and line numbers) do not."""
    for char, name in _YAML_LINE_BREAKS.items():
        if char in text:
            line = text.count("\n", 0, text.index(char)) + 1
            raise OptionError(f"{path}:{line}: a raw {name} character, which YAML reads as a line break; write it "
                              f"as \\u{ord(char):04x} inside a double-quoted string")


def _read_file(path: str, what: str) -> str:
    problem = file_problem(path, what)
    if problem:
        raise OptionError(problem)
    with open(path, encoding="utf-8", newline="") as f:
        return f.read()


def _parse_json(text: str, path: str, what: str):
    try:
        return strict_json.loads(text)
    except strict_json.StrictJsonError as e:
        raise OptionError(f"{path}: {e}") from None
    except json.JSONDecodeError as e:
        raise OptionError(f"{path}:{e.lineno}:{e.colno}: invalid JSON in the {what}: {e.msg}") from None


def check_option_names(options: dict, valid: list[str], path: str) -> None:
    for key in options:
        if key not in valid:
            hint = did_you_mean(str(key), valid) or " (python finetune.py --help lists them)"
            raise OptionError(f"{path}: unknown option {key!r}{hint}")


def numbers_from_text(options: dict, parser: HfArgumentParser, path: str) -> dict:
    """Numbers the file holds as text, as numbers: YAML reads `2e-2` (no dot) as a string, and the
    option classes do not convert it (the optimizer would fail on it much later)."""
    converted = dict(options)
    for key, value in options.items():
        action = parser._option_string_actions.get(f"--{key}")
        if isinstance(value, str) and action is not None and action.type in (int, float):
            try:
                converted[key] = action.type(value)
            except ValueError:
                raise OptionError(f"{path}: {key}: {value!r} is not {'an integer' if action.type is int else 'a number'}"
                                  ) from None
    return converted


def check_deepspeed_config(value) -> None:
    """A --deepspeed file must exist and hold a JSON object (checked here: the training options
    read it while they are built, and would fail with a traceback)."""
    if not isinstance(value, str) or not value:
        return
    if value.lstrip().startswith("{"):  # an inline JSON config
        config = _parse_json(value, "--deepspeed", "inline DeepSpeed config")
    else:
        config = _parse_json(_read_file(value, "--deepspeed config"), value, "--deepspeed config")
    if not isinstance(config, dict):
        raise OptionError(f"--deepspeed {value}: a DeepSpeed config is a JSON object, found {type(config).__name__}")


def check_options(model_args: ModelArguments, data_args: DataArguments, training_args) -> None:
    """Everything that can be checked before loading a model; raises OptionError."""
    if data_args.train_format not in TRAIN_FORMATS:
        raise OptionError(f"--train_format {data_args.train_format!r} is not one of {', '.join(TRAIN_FORMATS)}")
    if training_args.do_train and not data_args.train_file:
        raise OptionError("--do_train needs --train_file")
    if data_args.val_size is not None:
        _check_val_size(data_args)
    elif training_args.do_eval and not data_args.validation_file:
        raise OptionError("--do_eval needs --validation_file, or --val_size to hold out part of --train_file")
    if training_args.do_predict and not data_args.test_file:
        raise OptionError("--do_predict needs --test_file")
    for name in ("train_file", "validation_file", "test_file"):
        path = getattr(data_args, name)
        if path and not os.path.exists(path) and getattr(training_args, "plan", False):
            continue  # a plan made before the data exists uses the caps
        problem = path and data_source_problem(path)
        if problem:  # before anything hashes or reads it: a device or a named pipe would never end
            raise OptionError(f"--{name} {problem}")
    if not os.path.isdir(model_args.model_name_or_path):
        planning = ("; to plan before the weights are there: --model_name_or_path configs/chatglm3-6b "
                    "(BASE_MODEL_PATH=configs/chatglm3-6b), ChatGLM3-6B's config alone"
                    if getattr(training_args, "plan", False) else "")
        raise OptionError(f"--model_name_or_path {model_args.model_name_or_path}: no such folder "
                          f"(models load from local folders only; convert an original ChatGLM3 folder with "
                          f"scripts/convert_chatglm3.py{planning})")
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
    if data_args.packing and model_args.attn_implementation not in PACKING_ATTENTION:
        raise OptionError(f"--packing attends per record with {' or '.join(a for a in PACKING_ATTENTION if a)}: "
                          f"drop --attn_implementation {model_args.attn_implementation}")
    if data_args.packing and model_args.attn_implementation == "flash_attention_2" and model_args.tuning_method == "ptuning":
        raise OptionError("--packing with flash_attention_2 cannot show the P-Tuning prefix to every record (its "
                          "variable-length kernel takes no shared keys): drop --attn_implementation (packing then "
                          "uses packed_sdpa, which does)")
    check_flash_attention(model_args, data_args, training_args)
    check_quantization_with_deepspeed(model_args, training_args)
    if data_args.packing_row_length is not None and data_args.packing_row_length < 3:
        raise OptionError(f"--packing_row_length must be at least 3 tokens, got {data_args.packing_row_length}")
    if data_args.loss_chunk_size < 1:
        raise OptionError(f"--loss_chunk_size must be a positive number of positions, got {data_args.loss_chunk_size}")
    problem = length_cap_problem(caps_to_check(data_args))
    if problem:
        raise OptionError(problem)
    if not data_args.allow_longer_than_model and data_args.train_format in FIXED_RECORD_FORMAT:
        check_fits_model_context(model_args, data_args)
    check_safety_options(training_args)
    check_plan_options(training_args)


def check_flash_attention(model_args, data_args, training_args) -> None:
    """--attn_implementation flash_attention_2 needs the flash-attn package, no P-Tuning prefix, and
    bf16/fp16 compute (weights loaded in half precision, or --bf16/--fp16: autocast)."""
    if model_args.attn_implementation != "flash_attention_2":
        return
    other = ("drop --attn_implementation (--packing then attends per record with packed_sdpa)" if data_args.packing
             else "use --attn_implementation sdpa (the default)")
    if model_args.tuning_method == "ptuning":
        raise OptionError("--attn_implementation flash_attention_2 is not supported with P-Tuning v2: the prefix reaches "
                          "attention as cached keys ahead of the queries, which this toolkit checks against the reference "
                          f"computation with sdpa and eager only; {other}, or train LoRA with flash_attention_2")
    if importlib.util.find_spec("flash_attn") is None:
        raise OptionError("--attn_implementation flash_attention_2 needs the flash-attn package, which is not installed: "
                          f"pip install flash-attn (on a machine with CUDA), or {other}")
    weights = resolve_dtype(model_args.torch_dtype, frozen_base=model_args.tuning_method != "full",
                            use_cpu=training_args.use_cpu, deepspeed_dtype=deepspeed_dtype(training_args))
    if weights == torch.float32 and not (training_args.bf16 or training_args.fp16):
        raise OptionError("--attn_implementation flash_attention_2 computes in bf16 or fp16 only, and this run computes "
                          f"in fp32: add --bf16 (or --fp16; the launchers: PRECISION=bf16), or {other}")


def check_quantization_with_deepspeed(model_args, training_args) -> None:
    """ZeRO-3 partitions 4-bit weights (packed in the compute dtype), but bitsandbytes' 8-bit layers keep
    a whole copy of their weights outside the parameter ZeRO-3 partitions."""
    config = getattr(training_args, "hf_deepspeed_config", None)
    if model_args.quantization_bit == 8 and config is not None and config.is_zero3():
        raise OptionError("--quantization_bit 8 with DeepSpeed ZeRO-3 is refused: bitsandbytes' 8-bit layers keep a whole "
                          "copy of their weights beside the parameters ZeRO-3 partitions, so every rank would hold the "
                          "whole base; use ZeRO-2 (configs/ds_zero2.json), or --quantization_bit 4, which ZeRO-3 partitions")


def _check_val_size(data_args) -> None:
    if data_args.validation_file:
        raise OptionError(f"--val_size {data_args.val_size:g} and --validation_file {data_args.validation_file} "
                          f"both name evaluation data: keep one")
    if not data_args.train_file:
        raise OptionError("--val_size holds out part of --train_file: give --train_file")
    try:
        check_val_size(data_args.val_size)
    except SplitError as e:
        raise OptionError(f"--val_size {e}") from None


def check_fits_model_context(model_args, data_args) -> None:
    """Caps beyond max_position_embeddings would train on positions the model never learned; call
    it once the data's record format is known (--train_format auto/alpaca: after reading it)."""
    config_file = os.path.join(model_args.model_name_or_path, "config.json")
    try:
        with open(config_file, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError):
        return  # loading the model reports what is wrong with the folder
    context = config.get("max_position_embeddings") or config.get("seq_length")
    limits, longest = length_limits(data_args), max_sequence_length(data_args)
    if limits.max_seq_length:
        named = f"--max_seq_length {longest}"
    else:
        named = (f"--max_source_length {limits.max_source_length} + --max_target_length "
                 f"{limits.max_target_length} + 1 (the eos) = {longest} tokens")
    if isinstance(context, int) and longest > context:
        raise OptionError(f"{named} is longer than the model's context, max_position_embeddings {context} "
                          f"({config_file}): lower the cap, or pass --allow_longer_than_model to train beyond it")


def check_safety_options(training_args) -> None:
    if not math.isfinite(training_args.learning_rate) or training_args.learning_rate < 0:
        raise OptionError(f"--learning_rate must be a finite number >= 0, got {training_args.learning_rate}")
    if getattr(training_args, "nan_patience", 0) < 0:
        raise OptionError(f"--nan_patience must be >= 0, got {training_args.nan_patience}")
    if getattr(training_args, "nan_patience", 0) and (training_args.deepspeed or training_args.fp16):
        raise OptionError("--nan_patience needs a run without DeepSpeed and fp16: there the step is taken (or "
                          "skipped by loss scaling) before a bad batch can be dropped")
    if getattr(training_args, "save_every_minutes", 0) < 0:
        raise OptionError(f"--save_every_minutes must be >= 0, got {training_args.save_every_minutes}")


def check_plan_options(training_args) -> None:
    from chatglm3_finetune.plan.cards import parse_memory

    if getattr(training_args, "gpu_memory", None):
        try:
            parse_memory(training_args.gpu_memory)
        except ValueError as e:
            raise OptionError(f"--gpu_memory {e}") from None
    for name in ("plan_num_gpus", "plan_num_nodes"):
        value = getattr(training_args, name, None)
        if value is not None and value < 1:
            raise OptionError(f"--{name} must be at least 1, got {value}")


def _check_ptuning_checkpoint(model_args: ModelArguments) -> None:
    from chatglm3_finetune.model.ptuning.prefix_checkpoint import read_prefix_settings

    try:
        settings = read_prefix_settings(model_args.ptuning_checkpoint)
    except (FileNotFoundError, ValueError) as e:
        raise OptionError(f"--ptuning_checkpoint {model_args.ptuning_checkpoint}: {e}") from None
    if model_args.pre_seq_len is not None and model_args.pre_seq_len != settings.pre_seq_len:
        raise OptionError(
            f"--pre_seq_len {model_args.pre_seq_len} disagrees with the checkpoint {model_args.ptuning_checkpoint}, "
            f"which was trained with pre_seq_len {settings.pre_seq_len}: drop the flag (it is read from the checkpoint)"
        )
