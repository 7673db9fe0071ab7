"""scripts/make_tiny_model.py: the demo's tiny model and tokenizer, trained on the bundled samples."""

import json
import subprocess
import sys

import pytest
import torch

from conftest import ROOT

from chatglm3_finetune.model import make_tiny_model  # noqa: E402
from chatglm3_finetune.format.chat_format import SPECIAL_TOKENS  # noqa: E402
from chatglm3_finetune.format.tokenizer import load_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The script run once as a user runs it (default vocabulary of 600 pieces, a short pretraining);
    returns (folder, process)."""
    out = tmp_path_factory.mktemp("demo") / "models" / "tiny-chatglm3"
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "make_tiny_model.py"), "--output", str(out),
         "--hidden-size", "32", "--layers", "2", "--seed", "3", "--pretrain-steps", "15"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return out, done


def test_folder_loads_with_auto_model_and_our_tokenizer(built):
    from transformers import AutoModelForCausalLM

    out, _ = built
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = load_tokenizer(str(out))
    assert type(model).__name__ == "GlmForCausalLM"
    assert model.config.hidden_size == 32 and model.config.num_hidden_layers == 2
    assert tokenizer.num_pieces == 600
    assert model.config.vocab_size == len(tokenizer) == 600 + len(SPECIAL_TOKENS)
    assert sorted(model.generation_config.eos_token_id) == sorted(tokenizer.stop_token_ids)

    ids = [tokenizer.get_command("[gMASK]"), tokenizer.get_command("sop"), tokenizer.role_token_id("user")]
    ids += tokenizer.encode_text("北京现在天气怎么样？")
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), len(tokenizer)) and torch.isfinite(logits).all()


def test_special_tokens_follow_the_pieces(built):
    tokenizer = load_tokenizer(str(built[0]))
    assert [tokenizer.get_command(name) for name in SPECIAL_TOKENS] == list(range(600, 609))
    assert tokenizer.get_command("<|user|>") == 606 and tokenizer.get_command("<|observation|>") == 608
    assert tokenizer.stop_token_ids == [2, 606, 608]
    assert [tokenizer.sp.id_to_piece(i) for i in (0, 1, 2)] == ["<unk>", "<s>", "</s>"]


def test_vocabulary_is_trained_on_the_bundled_samples(built):
    tokenizer = load_tokenizer(str(built[0]))
    pieces = {tokenizer.sp.id_to_piece(i) for i in range(tokenizer.num_pieces)}
    for piece in ("▁need", "▁call", "裙", "采用"):
        assert piece in pieces, piece
    text = "这款连衣裙采用柔软的棉质面料"
    ids = tokenizer.encode_text(text)
    assert not any(3 <= i < 259 for i in ids), "sample characters should be pieces, not byte fallback"
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode(tokenizer.encode_text("line one\nline two")) == "line one\nline two"


def test_script_prints_what_it_wrote(built):
    out, done = built
    assert f"wrote {out}" in done.stdout
    assert "model.safetensors" in done.stdout and "tokenizer.model" in done.stdout and "pretraining.json" in done.stdout
    assert "2 layers, hidden 32" in done.stdout and "parameters" in done.stdout
    assert "pretrained 15 steps on" in done.stdout and "tokens of plain sample text, LM loss 6." in done.stdout
    assert "600 SentencePiece pieces" in done.stdout and "vocab 609" in done.stdout
    assert "[MASK] 600" in done.stdout and "<|observation|> 608" in done.stdout


def test_sample_texts_cover_what_the_demo_trains_on():
    texts = make_tiny_model.sample_texts()
    joined = "\n".join(texts)
    assert "getCurrentWeather: Get the current weather of a city." in joined   # NLDocumentation
    assert "tool_call(city='Paris')" in joined                                 # tool turns
    assert "I have the current weather in Paris.\nIt is 18°C and sunny in Paris right now." in texts
    assert "类型#" in joined and "让你轻松穿出好气质" in joined                  # AdvertiseGen


def test_pretraining_teaches_the_sample_texts(built):
    from chatglm3_finetune.model.tiny_model import lm_loss, token_stream

    out, _ = built
    pretraining = json.loads((out / "pretraining.json").read_text(encoding="utf-8"))
    assert pretraining["steps"] == 15 and pretraining["seed"] == 3
    assert {key: pretraining[key] for key in make_tiny_model.PRETRAIN_SETTINGS} == make_tiny_model.PRETRAIN_SETTINGS
    assert pretraining["loss_after"] < pretraining["loss_before"] - 0.5

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    stream = token_stream(load_tokenizer(str(out)), make_tiny_model.sample_texts())
    assert lm_loss(model, stream, 512) < pretraining["loss_before"] - 0.5


def test_same_seed_same_weights_and_bad_sizes_are_errors(tmp_path, capsys):
    from transformers import GlmForCausalLM

    first = make_tiny_model.make_tiny_model(str(tmp_path / "a"), vocab_size=560, hidden_size=16, seed=5,
                                            pretrain_steps=3)
    second = make_tiny_model.make_tiny_model(str(tmp_path / "b"), vocab_size=560, hidden_size=16, seed=5,
                                             pretrain_steps=3)
    assert first["parameters"] == second["parameters"]
    assert first["pretraining"] == second["pretraining"] and first["pretraining"]["steps"] == 3
    a = GlmForCausalLM.from_pretrained(tmp_path / "a").state_dict()
    b = GlmForCausalLM.from_pretrained(tmp_path / "b").state_dict()
    assert all(torch.equal(a[name], b[name]) for name in a)

    assert make_tiny_model.main(["--output", str(tmp_path / "e"), "--pretrain-steps", "-1"]) == 1
    assert "--pretrain-steps -1: use 0 (random weights) or more" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()

    assert make_tiny_model.main(["--output", str(tmp_path / "c"), "--hidden-size", "40"]) == 1
    assert "--hidden-size 40: use a positive multiple of 16" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()

    assert make_tiny_model.main(["--output", str(tmp_path / "d"), "--vocab-size", "300"]) == 1
    assert "--vocab-size 300 is too small: the sample texts need at least" in capsys.readouterr().err
