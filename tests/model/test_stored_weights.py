"""Loading a model in another dtype than the one it is stored in: the same weights as transformers'
own cast, one tensor at a time (the peak memory is measured by benchmarks/bench_load_memory.py and
its test); and the dtype full fine-tuning loads in under DeepSpeed."""

import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, GenerationConfig

from chatglm3_finetune.model.loading import deepspeed_dtype, load_base_model, resolve_dtype
from chatglm3_finetune.model.stored_weights import stored_dtype
from conftest import ROOT


def resaved(tiny_model_dir, folder, dtype, max_shard_size="50GB"):
    """The tiny model saved again in `dtype` (in several shards for a small max_shard_size)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=dtype)
    model.save_pretrained(str(folder), max_shard_size=max_shard_size)
    return str(folder)


def test_stored_dtype_reads_it_from_the_file_headers(tiny_model_dir, tmp_path):
    assert stored_dtype(tiny_model_dir) == torch.float32
    assert stored_dtype(resaved(tiny_model_dir, tmp_path / "bf16", torch.bfloat16)) == torch.bfloat16
    sharded = resaved(tiny_model_dir, tmp_path / "fp16", torch.float16, max_shard_size="100KB")
    assert len(json.loads((tmp_path / "fp16" / "model.safetensors.index.json").read_text())["weight_map"]) > 1
    assert stored_dtype(sharded) == torch.float16
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    save_file({"a": torch.zeros(2, dtype=torch.float16), "b": torch.zeros(2, dtype=torch.bfloat16)},
              str(mixed / "model.safetensors"))
    assert stored_dtype(str(mixed)) is None
    assert stored_dtype(str(tmp_path)) is None  # no weights: loading reports what is missing


@pytest.mark.parametrize("stored, wanted, shard", [(torch.float16, torch.bfloat16, "100KB"),
                                                   (torch.bfloat16, torch.float32, "50GB"),
                                                   (torch.float32, torch.float16, "50GB")])
def test_loading_another_dtype_gives_what_transformers_own_cast_gives(tiny_model_dir, tmp_path, monkeypatch, stored,
                                                                      wanted, shard):
    from chatglm3_finetune.model import loading

    folder = resaved(tiny_model_dir, tmp_path / "stored", stored, max_shard_size=shard)
    casts, cast = [], loading.cast_from_files
    monkeypatch.setattr(loading, "cast_from_files", lambda *args: casts.append(args[2:]) or cast(*args))
    ours = load_base_model(folder, wanted)
    assert casts == [(stored, wanted)]  # loaded as stored (memory-mapped), then cast tensor by tensor
    theirs = AutoModelForCausalLM.from_pretrained(folder, dtype=wanted)
    ours_state, theirs_state = ours.state_dict(), theirs.state_dict()
    assert ours_state.keys() == theirs_state.keys()
    for name, tensor in theirs_state.items():
        assert ours_state[name].dtype == tensor.dtype and torch.equal(ours_state[name], tensor), name
    assert {p.dtype for p in ours.parameters()} == {wanted}
    assert ours.config.dtype == theirs.config.dtype == wanted
    assert ours.name_or_path == folder
    assert ours.generation_config.to_dict() == GenerationConfig.from_pretrained(folder).to_dict() | {
        "transformers_version": ours.generation_config.transformers_version}
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, rtol=0, atol=0)


def test_full_fine_tuning_under_deepspeed_loads_in_its_precision():
    """`auto`: DeepSpeed's bf16/fp16 for trained weights under DeepSpeed (its engine casts them anyway);
    fp32 for trained weights without it (autocast trains fp32 weights); a frozen base on the CPU in fp32."""
    from transformers import Seq2SeqTrainingArguments

    def training_args(**flags):
        return Seq2SeqTrainingArguments(output_dir="unused", use_cpu=True, report_to="none", **flags)

    config = str(ROOT / "configs" / "ds_zero2.json")
    assert deepspeed_dtype(training_args(deepspeed=config, bf16=True)) == torch.bfloat16
    assert deepspeed_dtype(training_args(deepspeed=config)) is None
    assert deepspeed_dtype(training_args(bf16=True)) is None
    assert resolve_dtype("auto", frozen_base=False, use_cpu=True, deepspeed_dtype=torch.bfloat16) == torch.bfloat16
    assert resolve_dtype("auto", frozen_base=False, use_cpu=True, deepspeed_dtype=torch.float16) == torch.float16
    assert resolve_dtype("auto", frozen_base=False, use_cpu=True) == torch.float32
    assert resolve_dtype("auto", frozen_base=True, use_cpu=True, deepspeed_dtype=torch.bfloat16) == torch.float32
    assert resolve_dtype("float32", frozen_base=False, deepspeed_dtype=torch.bfloat16) == torch.float32
