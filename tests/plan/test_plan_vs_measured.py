"""The plan against the measured peak of the same step run with real tensors on the CPU.

The measurement is torch.profiler's record of every CPU allocation and free (profile_memory=True),
summed in time order: nothing of the plan's own accounting is used. The plan must be within 5%
of the measured peak, and within 5% of what the step added to the memory live before it (the
stricter test: the weights, equal in both, do not dilute it).
"""

import pytest
import torch

from chatglm3_finetune.plan.measured import measure_step
from chatglm3_finetune.plan.simulate import simulate
from plan_cases import make_spec

TOLERANCE = 0.05

CASES = {  # name: make_spec arguments
    "ptuning": dict(method="ptuning"),
    "ptuning_projection": dict(method="ptuning", projection=True),
    "ptuning_no_checkpointing": dict(method="ptuning", checkpointing=False),
    "ptuning_batch4": dict(method="ptuning", batch=4),
    "ptuning_packing": dict(method="ptuning", packing=True),
    "lora": dict(method="lora"),
    "lora_batch4_no_checkpointing": dict(method="lora", batch=4, checkpointing=False),
    "lora_packing": dict(method="lora", packing=True, batch=2),
    "full": dict(method="full"),
    "full_no_checkpointing_batch4": dict(method="full", checkpointing=False, batch=4),
    "full_accumulation": dict(method="full", grad_accum=2),
    "full_bf16_autocast": dict(method="full", mixed_precision="bf16"),
    "full_full_logits": dict(method="full", loss_on_targets_only=False),
    "ptuning_small_loss_chunks": dict(method="ptuning", batch=4, loss_chunk_size=64),
}
SMALL = ("ptuning", "ptuning_projection", "ptuning_no_checkpointing", "ptuning_batch4", "ptuning_packing", "lora",
         "full", "full_no_checkpointing_batch4")


def compare(spec):
    plan = simulate(spec, round_to=1)  # CPU allocations are not rounded to CUDA's blocks
    measured_peak, measured_start = measure_step(spec)
    return plan, measured_peak, measured_start


def check(plan, measured_peak, measured_start):
    assert measured_peak > measured_start > 0
    assert abs(plan.peak.total / measured_peak - 1) <= TOLERANCE, (plan.peak.total, measured_peak)
    planned_step = plan.peak.total - plan.start_bytes
    measured_step = measured_peak - measured_start
    assert abs(planned_step / measured_step - 1) <= TOLERANCE, (planned_step, measured_step, plan.peak.parts)


@pytest.mark.parametrize("case", CASES)
def test_tiny_model_plan_within_5_percent_of_the_measured_peak(case):
    torch.set_num_threads(1)
    check(*compare(make_spec("tiny", **CASES[case])))


@pytest.mark.slow
@pytest.mark.parametrize("case", SMALL)
def test_small_model_plan_within_5_percent_of_the_measured_peak(case):
    check(*compare(make_spec("small", length=256, **CASES[case])))


def test_a_wrong_plan_would_fail_the_check():
    """The comparison can fail: a plan that forgot the optimizer's states is caught."""
    plan, measured_peak, measured_start = compare(make_spec("tiny", method="full", length=32))
    forgotten = plan.peak.parts["optimizer_states"]
    assert forgotten > TOLERANCE * (measured_peak - measured_start)
    plan.peak.total -= forgotten
    with pytest.raises(AssertionError):
        check(plan, measured_peak, measured_start)
