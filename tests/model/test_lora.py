"""LoRA through peft: training with scripts/finetune_lora.sh (finetune.py), small adapter folders,
exact resume, gradient checkpointing, scripts/merge_lora.py, and loading for inference."""

import json
import os
import shlex
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT

from chatglm3_finetune.model import lora_merge as merge_lora  # noqa: E402
from chatglm3_finetune.model.loading import ModelLoadError, add_lora  # noqa: E402

LORA_ENV = {"LORA_RANK": "8", "LORA_ALPHA": "16", "LORA_DROPOUT": "0.05", "LORA_TARGET": "q_proj,v_proj"}


def launcher_env(model_dir, data, output_dir, cache_dir, **extra):
    return {**os.environ, **LORA_ENV, "USE_CPU": "1", "BASE_MODEL_PATH": model_dir, "FORMAT": "multi-turn",
            "DATASET_PATH": data, "OUTPUT_DIR": str(output_dir), "MAX_SEQ_LEN": "256", "MAX_STEP": "2",
            "SAVE_INTERVAL": "1", "DEV_BATCH_SIZE": "2", "GRAD_ACCUMULARION_STEPS": "1", "LR": "1e-2",
            "TOKENIZERS_PARALLELISM": "false", "PYTHON": sys.executable, "LOGGING_STEPS": "1",
            "EXTRA_ARGS": f"--max_train_samples 8 --report_to none --preprocessing_cache_dir {cache_dir}", **extra}


def run_launcher(env):
    done = subprocess.run(["bash", str(ROOT / "scripts" / "finetune_lora.sh")], env=env, cwd=str(ROOT),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir, formatted_samples, tmp_path_factory):
    """scripts/finetune_lora.sh on the CPU: 2 steps, a checkpoint after each; returns (output_dir, process)."""
    root = tmp_path_factory.mktemp("lora")
    output_dir = root / "run"
    done = run_launcher(launcher_env(tiny_model_dir, formatted_samples["multi-turn"], output_dir, root / "cache"))
    return output_dir, done


def adapter_weights(folder):
    return load_file(str(folder / "adapter_model.safetensors"))


def lora_args(**overrides):
    values = dict(quantization_bit=None, lora_rank=4, lora_alpha=8.0, lora_dropout=0.0, lora_target="all-linear")
    return SimpleNamespace(**{**values, **overrides})


def random_adapter(base_dir, folder, seed=0):
    """A LoRA adapter with random (non-zero) A and B on every linear layer, saved to folder."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    model.save_pretrained(str(folder))
    return folder


def logits_of(model, input_ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=input_ids).logits


# ---- training through the launcher ------------------------------------------------------------------

@pytest.mark.slow
def test_launcher_saves_small_adapter_folders(lora_run, tiny_model_dir):
    from chatglm3_finetune.train.manifest import folder_problem
    from trainer import find_resume_checkpoint

    output_dir, done = lora_run
    assert "--lora_rank 8" in done.stderr and "--activation_checkpointing" in done.stderr  # the command, on stderr
    assert (output_dir / "train.log").read_text().count("Sanity Check >>>>>>>>>>>>>") == 1
    for folder in (output_dir, output_dir / "checkpoint-1", output_dir / "checkpoint-2"):
        names = set(os.listdir(folder))
        assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.model",
                "tokenizer_config.json"} <= names
        assert not names & {"model.safetensors", "pytorch_model.bin", "prefix_encoder.safetensors"}
        assert os.path.getsize(folder / "adapter_model.safetensors") < 64_000  # the base is ~600 kB
    config = json.loads((output_dir / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"], config["lora_dropout"]) == ("LORA", 8, 16, 0.05)
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    assert config["base_model_name_or_path"] == tiny_model_dir
    assert folder_problem(str(output_dir / "checkpoint-1")) is None and folder_problem(str(output_dir)) is None
    assert find_resume_checkpoint(str(output_dir)) == str(output_dir / "checkpoint-2")


@pytest.mark.slow
def test_only_the_adapters_were_trained(lora_run, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    output_dir, _ = lora_run
    weights = adapter_weights(output_dir)
    assert weights and all(".lora_A." in name or ".lora_B." in name for name in weights)
    assert {name.split(".")[-3] for name in weights} == {"q_proj", "v_proj"}
    assert all(weights[name].abs().max() > 0 for name in weights if ".lora_B." in name)  # B starts at zero

    optimizer = torch.load(output_dir / "checkpoint-2" / "optimizer.pt", weights_only=True)
    assert len(optimizer["state"]) == len(weights) == 2 * 2 * 2  # layers x (q, v) x (A, B): nothing else trained
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(output_dir))
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    assert not torch.allclose(logits_of(loaded, ids), logits_of(base, ids))


@pytest.mark.slow
def test_rerun_resumes_from_the_newest_checkpoint_exactly(lora_run, tiny_model_dir, formatted_samples, tmp_path,
                                                          finetune_in_process, monkeypatch):
    """An interrupted run (only checkpoint-1 left), rerun with the launcher's command (DRY_RUN=1 prints it)
    and the same output folder, ends where the uninterrupted run did. The printed finetune.py command runs
    in-process, from the project root as the launcher would run it (the launcher's own run is lora_run)."""
    output_dir, _ = lora_run
    interrupted = tmp_path / "run"
    interrupted.mkdir()
    shutil.copytree(output_dir / "checkpoint-1", interrupted / "checkpoint-1")
    env = launcher_env(tiny_model_dir, formatted_samples["multi-turn"], interrupted, tmp_path / "cache", DRY_RUN="1")
    command = shlex.split(run_launcher(env).stdout)
    assert command[:2] == [sys.executable, "finetune.py"]  # one process, no torchrun
    monkeypatch.chdir(ROOT)
    done = finetune_in_process(*command[2:])
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"Resuming from {interrupted / 'checkpoint-1'}" in done.stdout
    expected, resumed = adapter_weights(output_dir / "checkpoint-2"), adapter_weights(interrupted)
    assert expected.keys() == resumed.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=0, atol=1e-7)


# ---- in-process LoRA --------------------------------------------------------------------------------

@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_lora_gradients(tiny_model_dir, reentrant):
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[5, 17, 42, 99, 7, 3, 11, 64], [8, 9, 10, 11, 12, 13, 14, 15]])

    def lora_gradients(checkpointing):
        torch.manual_seed(0)
        model = add_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir), lora_args())
        for name, param in model.named_parameters():  # B != 0, so A gets gradients too
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.1)
        if checkpointing:
            model.activation_checkpointing_enable({"use_reentrant": reentrant})
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    plain, checkpointed = lora_gradients(False), lora_gradients(True)
    assert plain.keys() == checkpointed.keys() and len(plain) == 2 * 2 * 6  # 2 layers, A and B, 6 linear layers
    for name, grad in plain.items():
        assert checkpointed[name] is not None and grad.abs().max() > 0
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-7)


def test_bad_lora_options_say_what_to_do(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with pytest.raises(ModelLoadError, match=r"--lora_target query_key_value: no such module in this model; its "
                                             r"linear layers are down_proj,gate_up_proj,k_proj,o_proj,q_proj,v_proj"):
        add_lora(base, lora_args(lora_target="query_key_value"))
    with pytest.raises(ModelLoadError, match="--lora_rank must be at least 1, got 0"):
        add_lora(base, lora_args(lora_rank=0))
    with pytest.raises(ModelLoadError, match="--lora_target is empty"):
        add_lora(base, lora_args(lora_target=" , "))


# ---- merging ----------------------------------------------------------------------------------------

def test_merged_model_gives_the_adapted_logits(tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = random_adapter(tiny_model_dir, tmp_path / "adapter")
    merged_dir = merge_lora.merge_lora(str(adapter), str(tmp_path / "merged"), base=tiny_model_dir)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    assert not any("lora" in name for name in merged.state_dict())
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(adapter))
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = torch.tensor([[5, 17, 42, 99, 7, 3, 11, 64, 2]])
    expected = logits_of(adapted, ids)
    torch.testing.assert_close(logits_of(merged, ids), expected, rtol=0, atol=2e-5)
    assert (logits_of(base, ids) - expected).abs().max() > 0.1  # the adapter does change the model
    assert os.path.isfile(os.path.join(merged_dir, "tokenizer.model"))  # the adapter has none: from the base


def test_merged_model_is_written_in_shards_that_load_with_the_same_logits(tiny_model_dir, tmp_path):
    """--max_shard_size splits the weights into several safetensors files plus their index, which
    AutoModelForCausalLM loads; the default (4GB) keeps a small model in one file."""
    import re

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = random_adapter(tiny_model_dir, tmp_path / "adapter")
    sharded, single = tmp_path / "sharded", tmp_path / "single"
    merge_lora.main(["--adapter", str(adapter), "--base", tiny_model_dir, "--output", str(sharded),
                     "--max_shard_size", "200KB"])
    merge_lora.main(["--adapter", str(adapter), "--base", tiny_model_dir, "--output", str(single)])
    shards = sorted(path.name for path in sharded.glob("*.safetensors"))
    assert len(shards) >= 3, shards
    assert all(re.fullmatch(rf"model-\d{{5}}-of-{len(shards):05d}\.safetensors", name) for name in shards), shards
    assert all((sharded / name).stat().st_size <= 200_000 + 10_000 for name in shards)  # + the file's header
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == shards
    assert sorted(path.name for path in single.glob("*.safetensors")) == ["model.safetensors"]
    from_shards = AutoModelForCausalLM.from_pretrained(str(sharded))
    from_single = AutoModelForCausalLM.from_pretrained(str(single))
    assert from_shards.state_dict().keys() == from_single.state_dict().keys()
    ids = torch.tensor([[5, 17, 42, 99, 7, 3, 11, 64, 2]])
    torch.testing.assert_close(logits_of(from_shards, ids), logits_of(from_single, ids), rtol=0, atol=0)
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(adapter))
    torch.testing.assert_close(logits_of(from_shards, ids), logits_of(adapted, ids), rtol=0, atol=2e-5)


@pytest.mark.slow
def test_merge_script_end_to_end(lora_run, tiny_model_dir, tmp_path, capsys):
    """The trained adapter (base read from adapter_config.json), saved in bf16; the tokenizer comes along."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from chatglm3_finetune.format.tokenizer import load_tokenizer

    output_dir, _ = lora_run
    merged_dir = tmp_path / "merged"
    merge_lora.main(["--adapter", str(output_dir), "--output", str(merged_dir), "--dtype", "bfloat16"])
    assert capsys.readouterr().out.strip() == f"Merged model: {merged_dir}"
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir))
    assert merged.dtype == torch.bfloat16
    assert load_tokenizer(str(merged_dir)).encode_text("Hello") == load_tokenizer(tiny_model_dir).encode_text("Hello")
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(output_dir))
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    torch.testing.assert_close(logits_of(merged, ids).float(), logits_of(adapted, ids), rtol=0, atol=0.05)


def test_merge_script_errors(tiny_model_dir, tmp_path, capsys):
    from transformers import GlmForCausalLM

    from chatglm3_finetune.model.tiny_model import tiny_glm_config

    adapter = random_adapter(tiny_model_dir, tmp_path / "adapter")
    other_base = tmp_path / "other-base"
    GlmForCausalLM(tiny_glm_config(609, hidden_size=32)).save_pretrained(str(other_base))
    cases = [
        (["--adapter", str(tmp_path / "missing"), "--output", str(tmp_path / "o1")],
         f"--adapter {tmp_path / 'missing'}: no such folder"),
        (["--adapter", tiny_model_dir, "--output", str(tmp_path / "o2")],
         f"--adapter {tiny_model_dir}: not a LoRA adapter folder (no adapter_config.json)"),
        (["--adapter", str(adapter), "--base", str(tmp_path / "nobase"), "--output", str(tmp_path / "o3")],
         f"base model {tmp_path / 'nobase'}: missing (no such folder)"),
        (["--adapter", str(adapter), "--base", str(tmp_path), "--output", str(tmp_path / "o3")],
         f"base model {tmp_path}: not a model folder (no config.json)"),
        (["--adapter", str(adapter), "--base", tiny_model_dir, "--output", str(adapter)],
         "is the base or adapter folder: choose a new folder"),
        (["--adapter", str(adapter), "--base", tiny_model_dir, "--output", str(tmp_path / "o5"), "--max_shard_size",
          "4 parsecs"], "--max_shard_size '4 parsecs' is not a size: give bytes or a number with a unit, e.g. 500MB"),
        (["--adapter", str(adapter), "--base", str(other_base), "--output", str(tmp_path / "o4")],
         f"adapter {adapter} does not fit base {other_base} (size mismatch for"),
    ]
    capsys.readouterr()
    for argv, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            merge_lora.main(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]  # after transformers' progress bars
        assert err.startswith("error: ") and message in err, err
    assert "it was trained on " + tiny_model_dir in err
    assert not (tmp_path / "o4").exists() and not (tmp_path / "o5").exists()


def test_chat_engine_loads_the_adapter(tiny_model_dir, tmp_path):
    """inference.py's loader (chat_engine, merges the adapter) gives the adapted model's logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from chatglm3_finetune.serve.chat_engine import load_chat_model

    adapter = random_adapter(tiny_model_dir, tmp_path / "adapter", seed=1)
    chat = load_chat_model(tiny_model_dir, lora=str(adapter), device="cpu", dtype="float32")
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(adapter))
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    torch.testing.assert_close(logits_of(chat.model, ids), logits_of(adapted, ids), rtol=0, atol=2e-5)
