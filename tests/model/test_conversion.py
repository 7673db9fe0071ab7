"""Converting original ChatGLM3 checkpoints to native GlmForCausalLM folders: the converted tiny model
reproduces what the ORIGINAL model code computed (../shared/data/chatglm3-tiny-original), from .bin
shards, safetensors shards or one file; the folder loads with no remote code; bad inputs are refused."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, TokenizersBackend

from chatglm3_finetune.model.conversion import AttentionShape, ConversionError, convert_checkpoint, convert_tensor
from chatglm3_finetune.format.tokenizer import ChatGLM3Tokenizer, load_tokenizer
from conftest import ROOT, shared_path

STOP_IDS = [2, 64795, 64797]


@pytest.fixture(scope="module")
def original_dir():
    return shared_path("chatglm3-tiny-original", "model")


@pytest.fixture(scope="module")
def reference():
    return load_file(shared_path("chatglm3-tiny-original", "reference_outputs.safetensors"))


@pytest.fixture(scope="module")
def converted_dir(original_dir, tmp_path_factory):
    """Converted in the original's float16, so the logits match the reference to 1e-4."""
    return convert_checkpoint(str(original_dir), str(tmp_path_factory.mktemp("converted") / "glm"), dtype="float16")


def original_state(original_dir) -> dict:
    state = {}
    for shard in sorted(original_dir.glob("pytorch_model-*.bin")):
        state.update(torch.load(shard, weights_only=True))
    return state


def copy_non_weights(original_dir, target):
    target.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "tokenizer.model", "tokenizer_config.json"):
        shutil.copy(original_dir / name, target / name)


def resave_as_safetensors_shards(original_dir, target):
    """The fixture as model-0000N-of-00002.safetensors + index, with the same split as its .bin shards."""
    copy_non_weights(original_dir, target)
    with open(original_dir / "pytorch_model.bin.index.json") as f:
        weight_map = json.load(f)["weight_map"]
    weight_map = {name: shard.replace("pytorch_model", "model").replace(".bin", ".safetensors")
                  for name, shard in weight_map.items()}
    state = original_state(original_dir)
    for shard in set(weight_map.values()):
        save_file({n: state[n].contiguous() for n, s in weight_map.items() if s == shard}, str(target / shard))
    with open(target / "model.safetensors.index.json", "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


def resave_as_single_bin(original_dir, target):
    copy_non_weights(original_dir, target)
    torch.save(original_state(original_dir), target / "pytorch_model.bin")


def assert_reproduces_reference(model_dir, reference, prefix=""):
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    for i in range(2):
        input_ids = reference[f"prompt{i}.input_ids"]
        with torch.no_grad():
            logits = model(input_ids).logits[0, -4:]
        diff = (logits - reference[f"prompt{i}.{prefix}logits"]).abs().max().item()
        assert diff <= 1e-4, f"prompt{i}: logits differ by {diff}"
        # none of the 8 reference tokens is a stop id, so the model's own stop settings cannot cut it short
        generated = model.generate(input_ids, max_new_tokens=8, do_sample=False)[0, input_ids.shape[1]:]
        assert generated.tolist() == reference[f"prompt{i}.{prefix}greedy8"].tolist()


def test_fixture_splits_a_layer_across_shards(original_dir):
    with open(original_dir / "pytorch_model.bin.index.json") as f:
        weight_map = json.load(f)["weight_map"]
    layer0 = "transformer.encoder.layers.0.self_attention.query_key_value."
    assert weight_map[layer0 + "weight"] != weight_map[layer0 + "bias"]


def test_converted_bin_shards_reproduce_original_model(converted_dir, reference):
    assert_reproduces_reference(converted_dir, reference)
    with safe_open(os.path.join(converted_dir, "model-00001-of-00002.safetensors"), "pt") as f:
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.float16  # as asked: exactly the original's


def test_the_cli_converts_to_bfloat16_by_default_and_says_so(original_dir, tmp_path, capsys):
    """The original checkpoint is float16; training and inference load bfloat16, which a bfloat16
    folder gives without a conversion pass (and --help says so)."""
    with open(original_dir / "config.json") as f:
        assert json.load(f)["torch_dtype"] == "float16"
    assert run_cli("--input", str(original_dir), "--output", str(tmp_path / "glm")) == 0
    dtypes = set()
    for shard in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        with safe_open(str(tmp_path / "glm" / shard), "pt") as f:
            dtypes |= {f.get_slice(name).get_dtype() for name in f.keys()}
    assert dtypes == {"BF16"}
    with open(tmp_path / "glm" / "config.json") as f:
        assert json.load(f)["dtype"] == "bfloat16"
    with pytest.raises(SystemExit):
        run_cli("--help")
    help_text = " ".join(capsys.readouterr().out.split())
    assert "default: bfloat16" in help_text and "original ChatGLM3-6B is float16" in help_text


def test_converted_safetensors_shards_reproduce_original_model(original_dir, reference, tmp_path):
    resave_as_safetensors_shards(original_dir, tmp_path / "original")
    out = convert_checkpoint(str(tmp_path / "original"), str(tmp_path / "glm"), dtype="float32")
    assert_reproduces_reference(out, reference)
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["dtype"] == "float32"


def test_converted_single_file_reproduces_original_model(original_dir, reference, tmp_path):
    resave_as_single_bin(original_dir, tmp_path / "original")
    out = convert_checkpoint(str(tmp_path / "original"), str(tmp_path / "glm"), dtype="bfloat16")
    assert sorted(p for p in os.listdir(out) if "safetensors" in p) == ["model.safetensors"]
    with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
        assert f.get_tensor("lm_head.weight").dtype == torch.bfloat16
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    # bf16 rounding of the fp16 weights moves the logits a little, not the model
    with torch.no_grad():
        logits = model(reference["prompt0.input_ids"]).logits[0, -4:]
    assert (logits - reference["prompt0.logits"]).abs().max().item() < 0.05


def test_config_and_generation_config(converted_dir):
    with open(os.path.join(converted_dir, "config.json")) as f:
        config = json.load(f)
    assert config["model_type"] == "glm" and config["architectures"] == ["GlmForCausalLM"]
    expected = {"num_hidden_layers": 2, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4,
                "num_key_value_heads": 2, "head_dim": 8, "vocab_size": 65024, "max_position_embeddings": 8192,
                "rms_norm_eps": 1e-5, "attention_bias": True, "tie_word_embeddings": False,
                "eos_token_id": STOP_IDS, "pad_token_id": 0}
    assert {key: config[key] for key in expected} == expected
    assert config["rope_parameters"] == {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
    with open(os.path.join(converted_dir, "generation_config.json")) as f:
        generation = json.load(f)
    assert generation["eos_token_id"] == STOP_IDS and generation["pad_token_id"] == 0


def test_rope_ratio_scales_theta(original_dir):
    from chatglm3_finetune.model.conversion import glm_config

    with open(original_dir / "config.json") as f:
        original = json.load(f)
    config = glm_config({**original, "rope_ratio": 50}, STOP_IDS, 0, torch.float16)
    assert config.rope_parameters["rope_theta"] == 500000.0
    config = glm_config({**original, "multi_query_attention": False}, STOP_IDS, 0, torch.float16)
    assert config.num_key_value_heads == 4


def test_query_key_value_rows_split_into_q_k_v():
    shape = AttentionShape(num_heads=4, num_kv_heads=2, head_dim=2)  # q 8 rows, k 4, v 4
    weight = torch.arange(16 * 3, dtype=torch.float32).reshape(16, 3)
    out = convert_tensor("transformer.encoder.layers.5.self_attention.query_key_value.weight", weight, shape)
    assert out["model.layers.5.self_attn.q_proj.weight"].equal(weight[:8])
    assert out["model.layers.5.self_attn.k_proj.weight"].equal(weight[8:12])
    assert out["model.layers.5.self_attn.v_proj.weight"].equal(weight[12:])
    bias = torch.arange(16.0)
    out = convert_tensor("transformer.encoder.layers.0.self_attention.query_key_value.bias", bias, shape)
    assert out["model.layers.0.self_attn.k_proj.bias"].tolist() == [8.0, 9.0, 10.0, 11.0]
    assert convert_tensor("transformer.rotary_pos_emb.inv_freq", torch.ones(2), shape) == {}
    with pytest.raises(ConversionError, match="expected 16"):
        convert_tensor("transformer.encoder.layers.0.self_attention.query_key_value.bias", torch.ones(12), shape)


def test_reloads_without_remote_code(converted_dir, reference):
    model, info = AutoModelForCausalLM.from_pretrained(converted_dir, output_loading_info=True)
    assert type(model).__name__ == "GlmForCausalLM"
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    fast = AutoTokenizer.from_pretrained(converted_dir)
    assert isinstance(fast, TokenizersBackend)
    slow = load_tokenizer(converted_dir)
    assert isinstance(slow, ChatGLM3Tokenizer)
    system, user = "You are a helpful assistant.", "What is the weather in Paris?"
    chat = [{"role": "system", "content": system}, {"role": "user", "content": user}]
    ours = ([slow.get_command("[gMASK]"), slow.get_command("sop")]
            + [slow.role_token_id("system")] + slow.encode_text("\n") + slow.encode_text(system)
            + [slow.role_token_id("user")] + slow.encode_text("\n") + slow.encode_text(user)
            + [slow.role_token_id("assistant")])
    got = fast.apply_chat_template(chat, add_generation_prompt=True, return_dict=False)
    assert got == ours == reference["prompt1.input_ids"][0].tolist()


# --- refusals -------------------------------------------------------------------------------------
def run_cli(*args) -> int:
    import runpy

    main = runpy.run_path(str(ROOT / "scripts" / "convert_chatglm3.py"))["main"]

    return main(list(args))


def bad_checkpoint(original_dir, target, **changes):
    """A folder like the fixture with config.json keys changed (None deletes), weights linked."""
    target.mkdir()
    with open(original_dir / "config.json") as f:
        config = json.load(f)
    config.update(changes)
    with open(target / "config.json", "w") as f:
        json.dump({k: v for k, v in config.items() if v is not None}, f)
    for path in original_dir.iterdir():
        if path.name != "config.json":
            os.symlink(path, target / path.name)
    return target


@pytest.mark.parametrize("changes, message", [
    ({"rmsnorm": False}, "rmsnorm false"),
    ({"add_bias_linear": True}, "add_bias_linear true"),
    ({"apply_residual_connection_post_layernorm": True}, "apply_residual_connection_post_layernorm true"),
    ({"post_layer_norm": False}, "post_layer_norm false"),
    ({"quantization_bit": 4}, "quantization_bit is 4"),
    ({"model_type": "llama"}, "not 'chatglm'"),
    ({"padded_vocab_size": None}, "missing padded_vocab_size"),
])
def test_cli_refuses_what_glm_cannot_express(original_dir, tmp_path, capsys, changes, message):
    source = bad_checkpoint(original_dir, tmp_path / "bad", **changes)
    assert run_cli("--input", str(source), "--output", str(tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_refuses_missing_files_and_a_used_output(original_dir, tmp_path, capsys):
    no_tokenizer = tmp_path / "no-tokenizer"
    copy_non_weights(original_dir, no_tokenizer)
    os.remove(no_tokenizer / "tokenizer.model")
    assert run_cli("--input", str(no_tokenizer), "--output", str(tmp_path / "o1")) == 2
    assert "no tokenizer.model" in capsys.readouterr().err

    no_weights = tmp_path / "no-weights"
    copy_non_weights(original_dir, no_weights)
    assert run_cli("--input", str(no_weights), "--output", str(tmp_path / "o2")) == 2
    assert "no weights" in capsys.readouterr().err

    missing_shard = tmp_path / "missing-shard"
    copy_non_weights(original_dir, missing_shard)
    shutil.copy(original_dir / "pytorch_model.bin.index.json", missing_shard)
    shutil.copy(original_dir / "pytorch_model-00001-of-00002.bin", missing_shard)
    assert run_cli("--input", str(missing_shard), "--output", str(tmp_path / "o3")) == 2
    assert "missing shard(s) pytorch_model-00002-of-00002.bin" in capsys.readouterr().err

    used = tmp_path / "used"
    used.mkdir()
    (used / "keep.txt").write_text("x")
    assert run_cli("--input", str(original_dir), "--output", str(used)) == 2
    assert "not empty" in capsys.readouterr().err


def test_refuses_incomplete_or_unreadable_weights_and_leaves_no_output(original_dir, tmp_path, capsys):
    incomplete = tmp_path / "incomplete"
    copy_non_weights(original_dir, incomplete)
    state = original_state(original_dir)
    del state["transformer.encoder.layers.1.mlp.dense_4h_to_h.weight"]
    torch.save(state, incomplete / "pytorch_model.bin")
    assert run_cli("--input", str(incomplete), "--output", str(tmp_path / "o1")) == 2
    assert "lacks 1 tensors, e.g. model.layers.1.mlp.down_proj.weight" in capsys.readouterr().err
    assert not (tmp_path / "o1").exists()

    unreadable = tmp_path / "unreadable"
    copy_non_weights(original_dir, unreadable)
    (unreadable / "pytorch_model.bin").write_bytes(b"not a checkpoint")
    assert run_cli("--input", str(unreadable), "--output", str(tmp_path / "o2")) == 2
    assert "pytorch_model.bin: cannot read the weights" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists()


def test_refuses_quantized_weights(original_dir):
    shape = AttentionShape(4, 2, 8)
    with pytest.raises(ConversionError, match="quantized"):
        convert_tensor("transformer.encoder.layers.0.mlp.dense_h_to_4h.weight", torch.zeros(2, 2, dtype=torch.int8), shape)
    with pytest.raises(ConversionError, match="quantized"):
        convert_tensor("transformer.encoder.layers.0.mlp.dense_h_to_4h.weight_scale", torch.zeros(2), shape)


def test_cli_process_exits_nonzero_without_traceback(original_dir, tmp_path):
    source = bad_checkpoint(original_dir, tmp_path / "bad", rmsnorm=False)
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "convert_chatglm3.py"), "--input", str(source),
                             "--output", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "rmsnorm false" in result.stderr and "Traceback" not in result.stderr


# --- P-Tuning v2 prefixes -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def original_ptuning_dir():
    return shared_path("chatglm3-tiny-original", "ptuning")


def test_converted_ptuning_reproduces_original_model(converted_dir, original_ptuning_dir, reference, tmp_path):
    from chatglm3_finetune.model.ptuning.prefix_checkpoint import PREFIX_FORMAT, read_prefix_settings
    from chatglm3_finetune.model.ptuning.prefix_model import PrefixTuningModel

    out = tmp_path / "prefix"
    assert run_cli("--ptuning", str(original_ptuning_dir), "--output", str(out), "--base", converted_dir) == 0
    settings = read_prefix_settings(str(out))
    assert settings["format"] == PREFIX_FORMAT
    assert (settings["pre_seq_len"], settings["prefix_projection"]) == (4, False)
    assert settings["base_model_name_or_path"] == converted_dir
    base = AutoModelForCausalLM.from_pretrained(converted_dir, dtype=torch.float32)
    model = PrefixTuningModel.from_pretrained(base, str(out))
    for i in range(2):
        input_ids = reference[f"prompt{i}.input_ids"]
        with torch.no_grad():
            logits = model(input_ids).logits[0, -4:]
        diff = (logits - reference[f"prompt{i}.ptuning_logits"]).abs().max().item()
        assert diff <= 1e-4, f"prompt{i}: logits with the prefix differ by {diff}"
        generated = model.generate(input_ids, max_new_tokens=8, do_sample=False)[0, input_ids.shape[1]:]
        assert generated.tolist() == reference[f"prompt{i}.ptuning_greedy8"].tolist()


def test_ptuning_without_base_reads_the_model_shape_from_its_own_config(original_ptuning_dir, tmp_path):
    from chatglm3_finetune.model.ptuning.prefix_checkpoint import load_prefix_state

    assert run_cli("--ptuning", str(original_ptuning_dir), "--output", str(tmp_path / "prefix")) == 0
    settings, state = load_prefix_state(str(tmp_path / "prefix"))
    original_settings, original_state = load_prefix_state(str(original_ptuning_dir))
    assert {k: v for k, v in settings.items() if k != "format"} == {
        k: v for k, v in original_settings.items() if k != "format"}
    assert state.keys() == original_state.keys() == {"embedding.weight"}
    assert state["embedding.weight"].equal(original_state["embedding.weight"])


def test_ptuning_refusals(original_dir, original_ptuning_dir, tiny_model_dir, tmp_path, capsys):
    assert run_cli("--ptuning", str(original_dir), "--output", str(tmp_path / "o1")) == 2
    assert "no pre_seq_len" in capsys.readouterr().err
    # the demo-sized tiny GLM has another head size than the model this prefix was trained for
    assert run_cli("--ptuning", str(original_ptuning_dir), "--output", str(tmp_path / "o2"),
                   "--base", tiny_model_dir) == 2
    assert "trained for another model" in capsys.readouterr().err
    assert run_cli("--ptuning", str(original_ptuning_dir), "--output", str(tmp_path / "o3")) == 0
    assert run_cli("--ptuning", str(tmp_path / "o3"), "--output", str(tmp_path / "o4")) == 2
    assert "already a prefix in this toolkit's format" in capsys.readouterr().err
    assert run_cli("--ptuning", str(original_ptuning_dir), "--output", str(tmp_path / "o5"),
                   "--base", str(tmp_path / "nowhere")) == 2
    assert f"--base {tmp_path / 'nowhere'}: missing (no such folder)" in capsys.readouterr().err
    assert run_cli("--ptuning", str(original_ptuning_dir), "--output", str(tmp_path / "o6"),
                   "--base", str(tmp_path)) == 2
    assert f"--base {tmp_path}: no config.json" in capsys.readouterr().err
    assert run_cli("--input", str(tmp_path / "nowhere"), "--output", str(tmp_path / "o7")) == 2
    assert f"{tmp_path / 'nowhere'}: missing (no such folder)" in capsys.readouterr().err


def test_cli_prints_its_last_line_once_and_writes_shareable_files(original_ptuning_dir, tmp_path):
    from chatglm3_finetune.train.file_modes import current_umask

    out = tmp_path / "prefix"
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "convert_chatglm3.py"), "--ptuning",
                             str(original_ptuning_dir), "--output", str(out)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert (result.stdout + result.stderr).count(f"-> {out}") == 1
    assert os.stat(out / "prefix_encoder.safetensors").st_mode & 0o777 == 0o666 & ~current_umask()
