"""The preview command (preprocess_utils.py): layout and summary, errors, caps checked as finetune checks them."""

import subprocess
import sys

import pytest

from conftest import ROOT
from chatglm3_finetune.data.records import MULTI_TURN, DataError
from chatglm3_finetune.data.encoding import LengthLimits, encode_multi_turn, sanity_check_lines
from preprocess_utils import preview
from test_records import write, jsonl, GOOD, conv, U, A



def test_preview_command_prints_layout_and_summary(tmp_path, real_tokenizer):
    record = {"tools": ["weather"], "conversations": [
        {"role": "user", "content": "Let me know the response details."},
        {"role": "assistant", "content": "I need to use the weather tool."}]}
    path = write(tmp_path, "tool.jsonl", jsonl(GOOD, record))
    result = subprocess.run(
        [sys.executable, str(ROOT / "preprocess_utils.py"), "--tokenizer", real_tokenizer.vocab_file.rsplit("/", 1)[0],
         "--train_format", "multi-turn", "--data", path, "--index", "1", "--max_seq_length", "2048"],
        capture_output=True, text=True, check=True)
    lines = result.stdout.splitlines()
    assert lines[:4] == ["Sanity Check >>>>>>>>>>>>>", "'[gMASK]':  64790 ->   -100", "'sop':  64792 ->   -100",
                         "'<|system|>':  64794 ->   -100"]
    assert "'I':    307 ->    307" in lines
    total = sum(len(encode_multi_turn(real_tokenizer, r).input_ids) for r in (GOOD, record))
    assert lines[-1].startswith(f"2 records, {total} tokens, ")
    assert lines[-1].endswith("0 truncated records (0 lost supervised targets, 0 lost the final stop target)")


def test_preview_command_reports_data_errors_without_traceback(tmp_path, tiny_model_dir):
    path = write(tmp_path, "bad.jsonl", jsonl(GOOD, conv(U, {"role": "sytem", "content": "x"})))
    result = subprocess.run([sys.executable, str(ROOT / "preprocess_utils.py"), "--tokenizer", tiny_model_dir,
                             "--train_format", "multi-turn", "--data", path], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip() == (f"error: {path}:2: conversations[1].role: 'sytem' is not one of system, "
                                     "user, assistant, tool, interpreter, observation; did you mean 'system'?")


def test_preview_function_rejects_bad_index(tmp_path, tiny_tokenizer):
    path = write(tmp_path, "d.jsonl", jsonl(GOOD))
    with pytest.raises(DataError, match="--index 3 is out of range"):
        preview(tiny_tokenizer, path, MULTI_TURN, LengthLimits(), index=3)


@pytest.mark.parametrize("flags,message", [
    (["--max_seq_length", "-5"], "--max_seq_length must be at least 3 tokens, got -5"),
    (["--max_seq_length", "0"], "--max_seq_length must be at least 3 tokens, got 0"),
    (["--max_source_length", "2"], "--max_source_length must be at least 3 tokens, got 2"),
    (["--max_target_length", "0"], "--max_target_length must be at least 1 tokens, got 0"),
])
def test_preview_rejects_caps_finetune_rejects(tmp_path, tiny_model_dir, capsys, flags, message):
    import preprocess_utils

    path = write(tmp_path, "d.jsonl", jsonl(GOOD))
    with pytest.raises(SystemExit) as exit_info:
        preprocess_utils.main(["--tokenizer", tiny_model_dir, "--train_format", "multi-turn", "--data", path, *flags])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().endswith(f"error: {message}")


def test_preview_names_its_own_tokenizer_flag(tmp_path, capsys):
    import preprocess_utils

    path = write(tmp_path, "d.jsonl", jsonl(GOOD))
    assert preprocess_utils.main(["--tokenizer", str(tmp_path / "none"), "--train_format", "multi-turn",
                                  "--data", path]) == 2
    assert capsys.readouterr().err.strip() == f"error: --tokenizer: {tmp_path / 'none'}: missing (no such folder)"
    assert preprocess_utils.main(["--tokenizer", str(tmp_path), "--train_format", "multi-turn", "--data", path]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --tokenizer: no tokenizer.model in {tmp_path}") and "tokenizer_name" not in err


def test_preview_warns_about_what_the_caps_cut(tmp_path, tiny_model_dir, capsys):
    import preprocess_utils

    long_prompt = {"conversations": [{"role": "user", "content": "word " * 60}, A]}
    path = write(tmp_path, "d.jsonl", jsonl(GOOD, long_prompt))
    assert preprocess_utils.main(["--tokenizer", tiny_model_dir, "--train_format", "multi-turn", "--data", path,
                                  "--max_seq_length", "20"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-2].startswith("warning: 1 of 2 records were cut by --max_seq_length 20")
    assert lines[-1].startswith("warning: 1 of 2 records left out because the cut removed every supervised target")


def test_sanity_check_of_a_long_record_shows_its_start_and_end(tiny_tokenizer):
    from chatglm3_finetune.data.encoding import SANITY_CHECK_HEAD, SANITY_CHECK_TAIL

    encoded = encode_multi_turn(tiny_tokenizer, conv(U, {"role": "assistant", "content": "word " * 400}))
    total = len(encoded.input_ids)
    full = sanity_check_lines(tiny_tokenizer, encoded.input_ids, encoded.labels, full=True)
    assert len(full) == total + 2
    short = sanity_check_lines(tiny_tokenizer, encoded.input_ids, encoded.labels)
    hidden = total - SANITY_CHECK_HEAD - SANITY_CHECK_TAIL
    assert short == (full[:SANITY_CHECK_HEAD + 1]
                     + [f"... {hidden} tokens not shown (--full_sanity_check shows every token) ..."]
                     + full[-SANITY_CHECK_TAIL - 1:])
    few = encode_multi_turn(tiny_tokenizer, GOOD)
    assert len(sanity_check_lines(tiny_tokenizer, few.input_ids, few.labels)) == len(few.input_ids) + 2
