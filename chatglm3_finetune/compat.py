"""Every use of a private transformers / torch / bitsandbytes / DeepSpeed API, behind a check of the
installed versions.

These internals change without notice between releases, and a changed one rarely fails: it
silently computes something else (a prefix dropped under gradient checkpointing, a label count
off by one). So each function here first checks that the library it reaches into is a version
this toolkit was tested with (`TESTED_VERSIONS`) and raises `UntestedVersionError` otherwise.
`CHATGLM3_FT_ALLOW_UNTESTED=1` turns that error into a warning, for whoever checks the results.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import inspect
import logging
import os

import torch
from packaging.version import Version

logger = logging.getLogger(__name__)

# major.minor of every library whose internals are used below, as pinned in requirements.txt
TESTED_VERSIONS = {"transformers": "5.24", "torch": "2.13", "bitsandbytes": "0.50", "peft": "0.21", "deepspeed": "0.19"}
ALLOW_UNTESTED_ENV = "CHATGLM3_FT_ALLOW_UNTESTED"


class UntestedVersionError(RuntimeError):
    """An installed library is not the version whose private API this toolkit was tested against."""


def installed_version(library: str) -> str | None:
    try:
        return importlib.metadata.version(library)
    except importlib.metadata.PackageNotFoundError:
        return None


def check_version(library: str) -> None:
    """Raises UntestedVersionError (a warning with CHATGLM3_FT_ALLOW_UNTESTED=1) when `library` is
    installed at another major.minor than TESTED_VERSIONS says; a library that is absent passes."""
    found = installed_version(library)
    if found is None or _same_minor(found, TESTED_VERSIONS[library]):
        return
    message = (f"chatglm3_finetune relies on private APIs of {library}, tested with {TESTED_VERSIONS[library]}.x, "
               f"but {library} {found} is installed: install the pinned versions (pip install -r requirements.txt)")
    if os.environ.get(ALLOW_UNTESTED_ENV) == "1":
        _warn_once(f"{message}. Continuing because {ALLOW_UNTESTED_ENV}=1: check the results.")
        return
    raise UntestedVersionError(f"{message}, or set {ALLOW_UNTESTED_ENV}=1 to run anyway at your own risk")


def check_versions() -> None:
    """check_version for every library in TESTED_VERSIONS (the entry points call it first)."""
    for library in TESTED_VERSIONS:
        check_version(library)


def _same_minor(found: str, tested: str) -> bool:
    return Version(found).release[:2] == Version(tested).release[:2]


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    logger.warning(message)


def _uses(*libraries: str):
    """Marks a function as reaching into these libraries' internals: checks them on every call."""
    def wrap(function):
        @functools.wraps(function)
        def checked(*args, **kwargs):
            for library in libraries:
                check_version(library)
            return function(*args, **kwargs)
        return checked
    return wrap


# ---- transformers: model configs ---------------------------------------------------------------

@_uses("transformers")
def model_name_or_path(config) -> str | None:
    """The folder or hub name a model config was loaded from (None when built in code)."""
    return getattr(config, "_name_or_path", None) or None


@_uses("transformers")
def attn_implementation(config) -> str:
    """The attention implementation a loaded model runs (eager, sdpa, flash_attention_2, ...)."""
    return getattr(config, "_attn_implementation", None) or "sdpa"


@_uses("transformers")
def cache_argument_name(model: torch.nn.Module) -> str:
    """`cache` in transformers >= 5.2x, `past_key_values` before (a wrong name would be silently ignored)."""
    parameters = inspect.signature(model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


# ---- transformers: caches and gradient checkpointing -------------------------------------------

@_uses("transformers")
def checkpointed_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The layers that transformers' gradient checkpointing wraps (the decoder layers)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [module for module in model.modules() if isinstance(module, GradientCheckpointingLayer)]


@_uses("transformers")
def keep_cache_under_checkpointing(layers: list[torch.nn.Module], keep: bool) -> None:
    """Whether checkpointed layers keep the cache argument (safe only for a cache that only reads:
    the backward replay then sees the same keys) or drop it, as transformers does by default."""
    if layers and not hasattr(type(layers[0]), "_can_checkpoint_with_cache"):
        raise UntestedVersionError("this transformers version drops the cache in checkpointed layers, which loses "
                                   "the P-Tuning prefix; install the pinned transformers (see requirements.txt)")
    for layer in layers:
        if keep:
            layer._can_checkpoint_with_cache = True
        else:
            layer.__dict__.pop("_can_checkpoint_with_cache", None)


# ---- transformers: the Trainer -----------------------------------------------------------------

@_uses("transformers")
def training_args_file_name() -> str:
    """The file the Trainer saves its TrainingArguments to in every checkpoint."""
    from transformers.trainer import TRAINING_ARGS_NAME

    return TRAINING_ARGS_NAME


@_uses("transformers")
def declare_causal_label_shift(trainer) -> None:
    """Tells the Trainer that the model's loss shifts labels (position i predicts label i+1), so
    `num_items_in_batch` counts labels[..., 1:] for every model kind, wrappers included (the Trainer
    only infers it for transformers' own causal-LM classes)."""
    if not hasattr(trainer, "_loss_shifts_labels"):
        raise UntestedVersionError("this transformers Trainer does not count targets as tested "
                                   "(no _loss_shifts_labels); install the pinned transformers")
    trainer._loss_shifts_labels = True


@_uses("transformers")
def trainer_generation_kwargs(trainer) -> dict:
    """The generation options Seq2SeqTrainer.evaluate/predict stored for prediction_step."""
    return dict(getattr(trainer, "_gen_kwargs", {}))


@_uses("transformers")
def trainer_prepare_inputs(trainer, inputs: dict) -> dict:
    """A batch moved to the device the way the Trainer moves its own."""
    return trainer._prepare_inputs(inputs)


@_uses("transformers")
def require_trainer_hooks(trainer_class: type, *names: str) -> type:
    """Checks that the Trainer still has the private methods a subclass overrides; returns the class."""
    missing = [name for name in names if not callable(getattr(trainer_class, name, None))]
    if missing:
        raise UntestedVersionError(f"this transformers Trainer has no {', '.join(missing)}, which "
                                   f"{trainer_class.__name__} overrides; install the pinned transformers")
    return trainer_class


# ---- torch -------------------------------------------------------------------------------------

class DtypeFollowingModule(torch.nn.Module):
    """A module told (`_after_apply`) whenever .to() / .half() / .bfloat16() / .cuda() changed its tensors."""

    def _apply(self, fn, *args, **kwargs):
        check_version("torch")
        result = super()._apply(fn, *args, **kwargs)
        self._after_apply()
        return result

    def _after_apply(self) -> None:
        pass


# ---- bitsandbytes ------------------------------------------------------------------------------

@_uses("bitsandbytes")
def unpack_4bit_for_training(module) -> bool:
    """Stops a bitsandbytes Linear4bit from repacking its weight for the CPU inference kernel, and
    undoes a repack that already happened; returns whether it had been repacked."""
    module.support_avx512bf16_for_cpu = False
    state = getattr(module.weight, "quant_state", None)
    if not getattr(state, "packing_format_for_cpu", False):
        return False
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu_inverse(module.weight.data, state)
    return True


# ---- DeepSpeed ---------------------------------------------------------------------------------

def zero3_partitioned(parameters) -> bool:
    """Whether DeepSpeed ZeRO-3 partitions these parameters (gather them before reading or writing)."""
    return any(hasattr(param, "ds_id") for param in parameters)


def _trained_by_deepspeed(params: list[torch.nn.Parameter]) -> bool:
    """Whether a DeepSpeed optimizer holds fp32 master weights for all these parameters."""
    return bool(params) and all(hasattr(param, "_z3_optimizer") or hasattr(param, "_hp_mapping") for param in params)


def deepspeed_master_weights(module: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """The full fp32 weights DeepSpeed's optimizer trains for `module`'s parameters, or None when no
    DeepSpeed optimizer trains them. Under fp16/bf16 the module's own parameters are only their
    rounding (ZeRO-1/2 cast every parameter). Every rank must call it (it gathers the parts)."""
    params = dict(module.named_parameters())
    if not _trained_by_deepspeed(list(params.values())):
        return None
    check_version("deepspeed")
    from deepspeed.utils import safe_get_full_fp32_param

    return {name: safe_get_full_fp32_param(param) for name, param in params.items()}


def set_deepspeed_master_weights(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> bool:
    """Sets the fp32 weights DeepSpeed's optimizer trains for `module` (each rank its own part);
    False, and nothing set, when no DeepSpeed optimizer trains them."""
    params = dict(module.named_parameters())
    if not _trained_by_deepspeed(list(params.values())):
        return False
    check_version("deepspeed")
    from deepspeed.utils import safe_set_full_fp32_param

    for name, param in params.items():
        safe_set_full_fp32_param(param, state[name].to(param.device, torch.float32))
    return True


@_uses("deepspeed")
def skip_deepspeed_cpu_shared_memory_op() -> None:
    """Keeps DeepSpeed's comm layer from compiling its shared-memory all-reduce op, which it builds
    with the system compiler at the first start on a CPU. Without the op it reduces through
    torch.distributed (gloo), as on any other CPU. The build needs gcc on the node, and a build that
    was killed leaves a lock file at which every later CPU run waits forever without a word.
    On a GPU, DeepSpeed has no such op: nothing changes there."""
    import importlib

    # `import deepspeed.comm.torch as ...` would give torch itself: deepspeed.comm re-exports it as `torch`
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


@_uses("deepspeed")
@contextlib.contextmanager
def deepspeed_saves_trained_parameters_only(engine):
    """While active, the DeepSpeed checkpoints `engine.save_checkpoint` writes hold the trained
    parameters and their optimizer state, nothing of the frozen base: no frozen parameter (DeepSpeed's
    `exclude_frozen_parameters`) and no buffer or quantization constant of the module state (which
    that option keeps). Loading such a checkpoint needs a non-strict module load."""
    engine_class = type(engine)
    trained = {name for name, param in engine.module.named_parameters() if param.requires_grad}

    def save_checkpoint(save_dir, *args, **kwargs):
        kwargs["exclude_frozen_parameters"] = True
        return engine_class.save_checkpoint(engine, save_dir, *args, **kwargs)

    def module_state_dict(*args, **kwargs):
        state = engine_class.module_state_dict(engine, *args, **kwargs)
        for name in [name for name in state if name not in trained]:
            del state[name]
        return state

    engine.save_checkpoint, engine.module_state_dict = save_checkpoint, module_state_dict
    try:
        yield
    finally:
        del engine.save_checkpoint, engine.module_state_dict


__all__ = ["TESTED_VERSIONS", "ALLOW_UNTESTED_ENV", "UntestedVersionError", "check_version", "check_versions",
           "model_name_or_path", "attn_implementation", "cache_argument_name",
           "checkpointed_layers", "keep_cache_under_checkpointing", "training_args_file_name",
           "declare_causal_label_shift", "trainer_generation_kwargs", "trainer_prepare_inputs",
           "require_trainer_hooks", "DtypeFollowingModule", "unpack_4bit_for_training", "zero3_partitioned",
           "deepspeed_master_weights", "set_deepspeed_master_weights", "deepspeed_saves_trained_parameters_only"]
