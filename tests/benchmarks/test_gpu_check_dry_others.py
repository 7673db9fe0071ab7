"""`gpu_check.sh --dry` on the cases test_gpu_check.py does not train: 8- and 4-bit P-Tuning, LoRA,
full fine-tuning under ZeRO-2, ZeRO-3 and ZeRO-3 with offload, and the flash-attention row."""

import pytest

from test_gpu_check import CASES, DRY_CASES, check_trained, model, probed_ranks, run_dry

OTHER_CASES = [case for case in CASES if case not in DRY_CASES]


@pytest.mark.slow
def test_gpu_check_dry_runs_the_other_cases_with_save_resume_and_inference(tmp_path):
    summary, rows = run_dry(tmp_path, OTHER_CASES)
    flash = rows.pop("packing_flash_attn")
    if summary["versions"]["flash_attn"] == "absent":
        assert flash["status"] == "skipped" and flash["reason"] == "not run: flash_attn absent"
    else:
        rows["packing_flash_attn"] = flash
    check_trained(rows)
    for case in ("zero2", "zero3", "zero3_offload"):
        assert rows[case]["trainable_parameters"] == model.parameter_count("tiny"), case
        assert probed_ranks(tmp_path, case) == ["0", "1"], case  # two CPU ranks, each probed
