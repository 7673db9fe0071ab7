"""4/8-bit frozen bases (bitsandbytes) on the CPU: loading, forward, LoRA (QLoRA) and P-Tuning
training steps - also after an evaluation forward, which breaks 4-bit GLM layers unless they are
kept in the trainable layout - finetune.py end to end, and the clear errors."""

import json
import sys
from types import SimpleNamespace

import pytest
import torch

from conftest import ROOT
from chatglm3_finetune.model.loading import ModelLoadError, add_lora, add_prefix_tuning, keep_4bit_layers_trainable, load_base_model

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed: quantized bases cannot be tested")

IDS = torch.tensor([[5, 17, 42, 99, 7, 3, 11, 64, 30, 2], [8, 9, 10, 11, 12, 13, 14, 15, 16, 2]])
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj")


def load_quantized(path, bits):
    try:
        return load_base_model(path, torch.float32, quantization_bit=bits)
    except ModelLoadError as e:
        pytest.skip(f"this machine's bitsandbytes cannot load {bits}-bit models on the CPU: {e}")


def quantized_layer_type(bits):
    return bnb.nn.Linear8bitLt if bits == 8 else bnb.nn.Linear4bit


def tuning_args(bits):
    return SimpleNamespace(quantization_bit=bits, lora_rank=4, lora_alpha=8.0, lora_dropout=0.0,
                           lora_target="all-linear", ptuning_checkpoint=None, pre_seq_len=4, prefix_projection=False,
                           prefix_hidden_size=None, prefix_dropout=0.0)


def logits_of(model):
    model.eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.mark.parametrize("bits, tolerance", [(8, 0.05), (4, 0.3)])
def test_quantized_base_loads_and_runs(tiny_model_dir, bits, tolerance):
    model = load_quantized(tiny_model_dir, bits)
    layers = {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
              if isinstance(module, quantized_layer_type(bits))}
    assert layers == set(LINEAR_NAMES)  # every linear layer of the blocks; not the output layer
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == (torch.int8 if bits == 8 else torch.uint8)
    assert not isinstance(model.lm_head, quantized_layer_type(bits))
    reference = load_base_model(tiny_model_dir)
    assert model.get_memory_footprint() < reference.get_memory_footprint()
    expected, got = logits_of(reference), logits_of(model)
    assert ((got - expected).abs().mean() / expected.abs().mean()) < tolerance  # measured: 0.011 (8-bit), 0.12 (4-bit)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("method", ["lora", "ptuning"])
def test_training_steps_on_a_quantized_base_after_evaluation(tiny_model_dir, bits, method):
    """An evaluation forward first (as `generate` or an eval during training does), then training steps,
    another evaluation and another step: only the adapters/prefix learn, the quantized weights stay."""
    base = load_quantized(tiny_model_dir, bits)
    logits_of(base)
    if method == "lora":
        model = add_lora(base, tuning_args(bits))
    else:
        model = add_prefix_tuning(base, tuning_args(bits), tiny_model_dir)
    frozen = {name: module.weight.data.clone() for name, module in model.named_modules()
              if isinstance(module, quantized_layer_type(bits))}
    trained = [name for name, param in model.named_parameters() if param.requires_grad]
    expected_prefix = "lora_" if method == "lora" else "prefix_encoder"
    assert trained and all(expected_prefix in name for name in trained)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for step in range(4):
        if step == 2:
            logits_of(model)
        model.train()
        loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    for name, module in model.named_modules():
        if name in frozen:
            assert torch.equal(module.weight.data, frozen[name]), name


def test_4bit_layers_repacked_for_inference_are_unpacked(tiny_model_dir):
    """bitsandbytes repacks 4-bit weights for its CPU kernel on an eval forward (CPUs with AVX512-BF16);
    a backward through a repacked biased layer (GLM q/k/v) fails, so training unpacks them first."""
    model = load_quantized(tiny_model_dir, 4)
    logits_of(model)
    repacked = sum(getattr(m.weight.quant_state, "packing_format_for_cpu", False)
                   for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))
    assert repacked in (0, 2 * len(LINEAR_NAMES))  # none on CPUs without AVX512-BF16
    assert keep_4bit_layers_trainable(model) == repacked
    logits_of(model)
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False)
                   for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))
    assert keep_4bit_layers_trainable(model) == 0


@pytest.mark.parametrize("bits, method_flags", [(4, ["--lora_rank", "4"]), (8, ["--pre_seq_len", "4"])])
def test_load_for_training_gives_a_trainable_model_on_a_quantized_base(tiny_model_dir, tmp_path, bits, method_flags):
    """finetune.py's model step from parsed flags: QLoRA (4-bit) and P-Tuning on an 8-bit base."""
    from arguments import parse_args
    from chatglm3_finetune.model.loading import is_quantized, load_for_training

    model_args, _, training_args = parse_args([
        "--model_name_or_path", tiny_model_dir, "--train_format", "multi-turn", "--output_dir", str(tmp_path),
        "--use_cpu", "--gradient_checkpointing", "--quantization_bit", str(bits), *method_flags])
    model = load_for_training(model_args, training_args)
    base = model.get_base_model() if method_flags[0] == "--lora_rank" else model.base_model
    assert is_quantized(base) and base.device.type == "cpu"
    assert base.model.embed_tokens.weight.dtype == torch.float32
    logits_of(model)
    model.train()
    model(input_ids=IDS, labels=IDS).loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads) and any(g.abs().max() > 0 for g in grads)


@pytest.mark.parametrize("flags, message", [
    (["--quantization_bit", "4"],
     "--quantization_bit needs a frozen base: use it with P-Tuning (--pre_seq_len) or LoRA (--lora_rank)"),
    (["--quantization_bit", "3", "--lora_rank", "4"], "--quantization_bit must be 4 or 8, got 3"),
])
def test_unsupported_quantization_options_exit_before_loading(tiny_model_dir, formatted_samples, tmp_path, capsys,
                                                              flags, message):
    import finetune

    with pytest.raises(SystemExit) as exit_info:
        finetune.main(["--model_name_or_path", tiny_model_dir, "--train_format", "multi-turn", "--train_file",
                       formatted_samples["multi-turn"], "--output_dir", str(tmp_path / "o"), "--do_train",
                       "--use_cpu", *flags])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == f"error: {message}"


@pytest.fixture
def zero3_config_forgotten():
    """Parsing a ZeRO-3 --deepspeed config switches transformers to ZeRO-3 loading for the whole process."""
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled, unset_hf_deepspeed_config

    yield
    unset_hf_deepspeed_config()
    assert not is_deepspeed_zero3_enabled()


@pytest.mark.parametrize("method_flags", [["--lora_rank", "4"], ["--pre_seq_len", "4"]])
def test_an_8bit_base_under_zero3_is_refused_before_loading(tiny_model_dir, formatted_samples, tmp_path, capsys,
                                                            monkeypatch, zero3_config_forgotten, method_flags):
    """bitsandbytes' Linear8bitLt keeps its whole int8 weight in its own state, beside the parameter ZeRO-3
    partitions: every rank would hold the whole base (docs/training.md)."""
    import finetune

    monkeypatch.setattr(finetune, "load_for_training", lambda *_: pytest.fail("the model was loaded"))
    args = ["--model_name_or_path", tiny_model_dir, "--train_format", "multi-turn", "--train_file",
            formatted_samples["multi-turn"], "--output_dir", str(tmp_path / "o"), "--do_train", "--use_cpu",
            "--quantization_bit", "8", *method_flags]
    with pytest.raises(SystemExit) as exit_info:
        finetune.main([*args, "--deepspeed", str(ROOT / "configs" / "ds_zero3.json")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == (
        "error: --quantization_bit 8 with DeepSpeed ZeRO-3 is refused: bitsandbytes' 8-bit layers keep a whole copy "
        "of their weights beside the parameters ZeRO-3 partitions, so every rank would hold the whole base; use "
        "ZeRO-2 (configs/ds_zero2.json), or --quantization_bit 4, which ZeRO-3 partitions")
    from arguments import check_options, parse_args

    for accepted in (["--deepspeed", str(ROOT / "configs" / "ds_zero2.json")], []):
        check_options(*parse_args([*args, *accepted]))


def test_missing_bitsandbytes_is_a_clear_error(monkeypatch):
    from chatglm3_finetune.model.loading import quantization_config

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(ModelLoadError, match=r"--quantization_bit 4 needs bitsandbytes .*pip install bitsandbytes, "
                                             r"or drop --quantization_bit"):
        quantization_config(4, torch.bfloat16)
