"""The plan in words, in one line and as JSON."""

import json

from chatglm3_finetune.plan.cards import card_named
from chatglm3_finetune.plan.planner import make_plan
from chatglm3_finetune.plan.report import gb, plan_json, plan_text, summary_line
from plan_cases import make_spec


def test_a_plan_reads_and_serializes():
    spec = make_spec("tiny", method="lora", steps=None, use_cpu=False)
    plan = make_plan(spec, card_named("A10 24GB"), "named in the test", full=False)
    text = plan_text(plan)
    assert "Peak on one GPU" in text and "steps unknown" in text and "Verdict for A10 24GB" in text
    assert summary_line(plan).startswith(f"Memory plan: {gb(plan.peak_bytes)} per GPU at the peak of a step; A10 24GB")
    assert "fits" in summary_line(plan) and "for None steps" not in summary_line(plan)
    data = json.loads(json.dumps(plan_json(plan)))
    assert data["peak_bytes"] == sum(data["parts"].values()) and data["fits"] is True
    assert data["time"]["planned"]["seconds_for_run"] is None and data["time"]["planned"]["seconds_per_step"] > 0


def test_sizes_read_in_the_unit_that_fits_them():
    assert gb(14.9 * 2 ** 30) == "14.9 GB" and gb(7 * 2 ** 20) == "7 MB" and gb(0) == "0 MB"
    assert gb(50 * 2 ** 10) == "0.05 MB"
