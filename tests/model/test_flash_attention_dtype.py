"""What flash-attention would be handed in the runs `--attn_implementation flash_attention_2` is let
through (arguments.check_flash_attention): half-precision queries, keys and values. flash-attn needs a
GPU, so an attention function registered in its place records the dtypes transformers' flash-attention
wrapper would pass on (it casts fp32 inputs to the autocast dtype, else to the weights' dtype) and
computes with sdpa, in finetune.py runs on the CPU. With --bf16, full fine-tuning under DeepSpeed loads
the model in bf16, and without DeepSpeed it loads fp32 weights that autocast reaches; without --bf16,
fp32, which flash-attn rejects and the option check refuses."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from conftest import ROOT
from test_deepspeed import free_port

PROBE = textwrap.dedent("""
    import json, sys
    from transformers import AttentionInterface
    from transformers.integrations.flash_attention import get_target_dtype
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    seen = set()

    def dtype_probe(module, query, key, value, *args, **kwargs):
        target = get_target_dtype(query, module)  # what flash_attention_forward casts q, k, v to, if anything
        seen.update(str(target or tensor.dtype) for tensor in (query, key, value))
        return sdpa_attention_forward(module, query, key, value, *args, **kwargs)

    AttentionInterface.register("dtype_probe", dtype_probe)
    AttentionMaskInterface.register("dtype_probe", sdpa_mask)
    import finetune

    common, runs = json.loads(sys.argv[1]), json.loads(sys.argv[2])
    for index, flags in enumerate(runs):  # one process, the runs one after the other
        seen.clear()
        finetune.main(common + ["--output_dir", f"{sys.argv[3]}/run{index}"] + flags)
        print("SEEN " + json.dumps([flags, sorted(seen)]), flush=True)
""")

# The runs of one probe process; the DeepSpeed run last, so that the runs before it start in a
# process DeepSpeed has not set up.
RUNS = ([], ["--bf16"], ["--bf16", "--deepspeed", "configs/ds_zero2.json"])


@pytest.fixture(scope="module")
def attention_dtypes(tiny_model_dir, formatted_samples, tmp_path_factory):
    """attention_dtypes(*flags) -> the dtypes attention saw in a 2-step full fine-tuning run with these
    flags (one of RUNS, all run by one probe process)."""
    folder = tmp_path_factory.mktemp("attention_dtype")
    script = folder / "probe.py"
    script.write_text(PROBE)
    common = ["--model_name_or_path", tiny_model_dir, "--train_format", "input-output", "--train_file",
              formatted_samples["input-output"], "--max_source_length", "32", "--max_target_length", "32",
              "--max_train_samples", "4", "--per_device_train_batch_size", "2", "--max_steps", "2",
              "--save_strategy", "no", "--do_train", "--use_cpu", "--report_to", "none",
              "--attn_implementation", "dtype_probe", "--preprocessing_cache_dir", str(folder / "cache")]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}
    result = subprocess.run([sys.executable, str(script), json.dumps(common), json.dumps(RUNS), str(folder)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    seen = {tuple(flags): dtypes for flags, dtypes in
            (json.loads(line[len("SEEN "):]) for line in result.stdout.splitlines() if line.startswith("SEEN "))}
    assert result.returncode == 0 and len(seen) == len(RUNS), result.stdout[-3000:] + result.stderr[-3000:]

    def dtypes(*flags: str) -> list[str]:
        return seen[flags]
    return dtypes


@pytest.mark.slow
def test_bf16_full_fine_tuning_hands_attention_bf16(attention_dtypes):
    assert attention_dtypes("--bf16") == ["torch.bfloat16"]  # fp32 weights, autocast


@pytest.mark.slow
def test_bf16_deepspeed_hands_attention_bf16(attention_dtypes):
    assert attention_dtypes("--bf16", "--deepspeed", "configs/ds_zero2.json") == ["torch.bfloat16"]


@pytest.mark.slow
def test_without_bf16_attention_sees_fp32(attention_dtypes):
    assert attention_dtypes() == ["torch.float32"]
