"""The GPU check's cases and its three modes: what each case runs (a launcher with the variables and
flags a user would give it) at the shapes, lengths and step counts of each mode."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

PRE_SEQ_LEN = 128  # the reference's P-Tuning v2 setting


@dataclass(frozen=True)
class Mode:
    """Where the check runs: a GPU, this CPU at full 6B shape (a rehearsal), or tiny shapes (a test)."""

    name: str
    big_shape: str  # the model of the P-Tuning, LoRA and packing cases
    deepspeed_shape: str  # the model of the ZeRO cases
    tokens: int  # tokens per training row
    pack_lengths: tuple[int, ...]  # the records one packed row holds (they add up to `tokens`)
    steps: int  # optimizer steps of the first run; the resume adds one
    deepspeed_ranks: int  # processes of the ZeRO cases
    env: dict = field(default_factory=dict)  # launcher variables of every case
    frozen_base_args: tuple[str, ...] = ()  # finetune.py flags of the P-Tuning and LoRA cases
    serialize_big: bool = False  # run every process under the big-memory lock, one at a time
    device: str = "cuda"
    peak_dtype: str = "bfloat16"  # the dtype the cases train in, whose matmul peak the MFU is taken against


MODES = {
    # bf16 through PRECISION=auto; 3 steps so that 2 step times are measured after the first
    "gpu": Mode("gpu", "6b", "1b", tokens=2048, pack_lengths=(1024, 512, 320, 192), steps=3, deepspeed_ranks=1),
    # one step of 32 tokens per case at 6B (a minute or two at the CPU's ~10 bf16 GFLOP per CPU-second);
    # the frozen base must be bf16 (fp32, the CPU default, is 25 GB)
    "cpu": Mode("cpu", "6b", "small", tokens=32, pack_lengths=(20, 12), steps=1, deepspeed_ranks=2,
                env={"USE_CPU": "1", "PRECISION": "bf16"}, frozen_base_args=("--torch_dtype", "bfloat16"),
                serialize_big=True, device="cpu"),
    # fp32, as USE_CPU's PRECISION=auto trains (a CPU without bf16 instructions takes minutes for a bf16 peak)
    "dry": Mode("dry", "tiny", "tiny", tokens=64, pack_lengths=(28, 20, 16), steps=1, deepspeed_ranks=2,
                env={"USE_CPU": "1"}, device="cpu", peak_dtype="float32"),
}


@dataclass(frozen=True)
class Case:
    name: str
    launcher: str  # scripts/<launcher>
    method: str  # ptuning, lora or full
    data: str  # conversations, packed (several records per row) or prompt_response
    env: dict = field(default_factory=dict)
    args: tuple[str, ...] = ()  # finetune.py flags after the launcher's own
    quantization_bit: int | None = None
    packed_reference: bool = False  # also train the same records unpacked, the same steps and resume: every loss must agree
    server: bool = False  # also serve the result with api_server.py and ask it one question
    needs: tuple[str, ...] = ()  # modules that must import, else the case is skipped with the reason
    attention: str = "sdpa"

    @property
    def deepspeed(self) -> bool:
        """Trained through finetune_ds.sh: the DeepSpeed model, its ranks and its records."""
        return self.launcher == "finetune_ds.sh"


PTUNING = dict(launcher="finetune_pt_multiturn.sh", method="ptuning", data="conversations",
               env={"PRE_SEQ_LEN": str(PRE_SEQ_LEN)})
LORA = dict(launcher="finetune_lora.sh", method="lora", data="conversations", env={"FORMAT": "multi-turn"})
ZERO = dict(launcher="finetune_ds.sh", method="full", data="prompt_response", needs=("deepspeed",))
# Dropout would draw different masks for a packed row and a padded batch: off for the comparison.
NO_PREFIX_DROPOUT = ("--prefix_dropout", "0")

CASES = [
    Case("ptuning", server=True, **PTUNING),
    Case("ptuning_8bit", quantization_bit=8, needs=("bitsandbytes",), **PTUNING),
    Case("ptuning_4bit", quantization_bit=4, needs=("bitsandbytes",), **PTUNING),
    Case("lora", **LORA),
    Case("qlora", quantization_bit=4, needs=("bitsandbytes",), **{**LORA, "env": {**LORA["env"], "LORA_TARGET": "all-linear"}}),
    Case("packing", **{**PTUNING, "data": "packed"}, args=("--packing", *NO_PREFIX_DROPOUT), packed_reference=True,
         attention="packed_sdpa"),
    Case("packing_flash_attn", **{**LORA, "data": "packed"}, args=("--packing", "--attn_implementation", "flash_attention_2"),
         packed_reference=True, needs=("flash_attn",), attention="flash_attention_2 varlen"),
    Case("zero2", **{**ZERO, "env": {"DS_CONFIG": "configs/ds_zero2.json"}}),
    # P-Tuning v2 under ZeRO-2 (the launcher's own example) at the P-Tuning launchers' learning rate
    # (finetune_ds.sh's 1e-4 is full fine-tuning's): its checkpoint must hold the prefix and its
    # optimizer state, not the frozen base.
    Case("zero2_ptuning", **{**ZERO, "method": "ptuning", "env": {"DS_CONFIG": "configs/ds_zero2.json", "LR": "2e-2"}},
         args=("--pre_seq_len", str(PRE_SEQ_LEN))),
    Case("zero3", **{**ZERO, "env": {"DS_CONFIG": "configs/ds_zero3.json"}}),
    Case("zero3_offload", **{**ZERO, "env": {"DS_CONFIG": "configs/ds_zero3_offload.json"}}),
]
CASE_NAMES = [case.name for case in CASES]


def case_named(name: str) -> Case:
    return next(case for case in CASES if case.name == name)


def shape_of(case: Case, mode: Mode) -> str:
    return mode.deepspeed_shape if case.deepspeed else mode.big_shape


def ranks_of(case: Case, mode: Mode) -> int:
    return mode.deepspeed_ranks if case.deepspeed else 1


def launcher_env(case: Case, mode: Mode, model_dir: str, data_path: str, output_dir: str, max_steps: int,
                 batch_size: int = 1) -> dict[str, str]:
    """The launcher variables of one run: the case's own, the mode's, and the schedule of the check
    (every step logged, a checkpoint after the first run's last step, no time-based saves)."""
    env = {**mode.env, **case.env, "BASE_MODEL_PATH": model_dir, "DATASET_PATH": data_path, "OUTPUT_DIR": output_dir,
           "MAX_STEP": str(max_steps), "SAVE_INTERVAL": str(mode.steps), "LOGGING_STEPS": "1",
           "DEV_BATCH_SIZE": str(batch_size), "GRAD_ACCUMULARION_STEPS": "1", "SAVE_EVERY_MINUTES": "0",
           "NUM_GPUS": str(ranks_of(case, mode))}
    if case.quantization_bit:
        env["QUANTIZATION_BIT"] = str(case.quantization_bit)
    if case.deepspeed:  # the prompt/response records: a prompt of 3/4 of the row, the response the rest
        env.update(MAX_SOURCE_LEN=str(prompt_tokens(mode)), MAX_TARGET_LEN=str(mode.tokens - prompt_tokens(mode) - 1))
    return env


def launcher_args(case: Case, mode: Mode) -> list[str]:
    """finetune.py flags given after the launcher's name."""
    return list(case.args) + (list(mode.frozen_base_args) if not case.deepspeed else [])


def reference_case(case: Case) -> Case:
    """The packed case's twin: the same records and flags, one padded batch, no packing."""
    return replace(case, name=case.name + "_unpacked", args=tuple(a for a in case.args if a != "--packing"),
                   packed_reference=False)


def prompt_tokens(mode: Mode) -> int:
    return mode.tokens * 3 // 4
