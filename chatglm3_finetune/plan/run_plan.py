"""The plan of a finetune.py run, from its parsed options: printed (`--plan`, `--plan_json`), or checked
before the model loads on a GPU (`check_memory_before_loading`).

The card planned for: `--gpu_memory` (its rate from the closest card in the table), else the
GPU this process would train on (memory read, matmul rate measured), else the table's default card; the
verdict table adds the common 24, 40 and 80 GB cards.
"""

from __future__ import annotations

import json
import logging
import os

from .advice import advise
from .cards import DEFAULT_CARD, Card, card_named, closest_card, parse_memory, visible_gpu
from .inputs import PlanInputError, run_spec
from .planner import Plan, allowances, make_plan, planned_peak
from .report import plan_json, plan_text, summary_line

logger = logging.getLogger(__name__)


def planned_card(training_args, use_cpu: bool) -> tuple[Card | None, str, int | None]:
    """(card, where it comes from, memory bytes)."""
    if use_cpu:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return None, "a CPU run", memory
    if getattr(training_args, "gpu_memory", None):
        try:
            memory = parse_memory(training_args.gpu_memory)
        except ValueError as e:
            raise PlanInputError(f"--gpu_memory {e}") from None
        rate_of = closest_card(memory)
        card = Card(f"a {memory / 2 ** 30:.1f} GB GPU", memory, rate_of.bf16_flops, rate_of.rate_source)
        return card, f"--gpu_memory; time at the rate of an {rate_of.name}", memory
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    visible = visible_gpu(local_rank)
    if visible is not None:
        return visible, "the GPU of this process", visible.memory_bytes
    card = card_named(DEFAULT_CARD)
    return card, "no GPU visible; --gpu_memory plans for another", card.memory_bytes


def plan_for(model_args, data_args, training_args, dataset=None, full: bool = True) -> Plan:
    """The plan of the run these options describe (with advice when it does not fit)."""
    use_cpu = bool(getattr(training_args, "use_cpu", False))
    card, source, memory = planned_card(training_args, use_cpu)
    spec = run_spec(model_args, data_args, training_args, getattr(training_args, "plan_num_gpus", None),
                    getattr(training_args, "plan_num_nodes", None), dataset=dataset)
    plan = make_plan(spec, card, source, memory, full=full)
    if plan.fits or use_cpu:
        return plan
    fixed = sum(allowances(spec, 0).values())
    if fixed >= plan.memory_bytes:
        plan.notes.append(f"the CUDA context and workspaces alone take {fixed / 2 ** 30:.1f} GB of the "
                          f"{plan.memory_bytes / 2 ** 30:.1f} GB: no change to the run can make it fit")
    else:
        plan.advice = advise(spec, plan.memory_bytes, lambda candidate: planned_peak(candidate)[0])
    return plan


def print_plan(model_args, data_args, training_args) -> int:
    """--plan / --plan_json: prints the plan (and writes its JSON); returns the exit code (0)."""
    print("Planning the run: one training step simulated on fake tensors (no weights are loaded) ...", flush=True)
    plan = plan_for(model_args, data_args, training_args)
    print(plan_text(plan), flush=True)
    if getattr(training_args, "plan_json", None):
        path = training_args.plan_json
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(plan_json(plan), f, indent=2)
        print(f"Plan written to {path}", flush=True)
    return 0


def memory_check_applies(training_args) -> bool:
    """GPU runs: a GPU is visible or --gpu_memory names one; never with --use_cpu."""
    if getattr(training_args, "use_cpu", False):
        return False
    if getattr(training_args, "gpu_memory", None):
        return True
    import torch

    return torch.cuda.is_available()


def check_memory_before_loading(model_args, data_args, training_args, dataset=None) -> str | None:
    """On a GPU run: prints the plan's summary line (main process) and returns the error to stop
    with when the plan is clearly over the card's memory (None to go on)."""
    if not memory_check_applies(training_args):
        return None
    plan = plan_for(model_args, data_args, training_args, dataset=dataset, full=False)
    if getattr(training_args, "process_index", 0) == 0:
        print(summary_line(plan), flush=True)
    if not plan.clearly_over:
        if not plan.fits:
            logger.warning("The memory plan is over this GPU's memory by less than the plan's margin: the run "
                           "may run out of memory (--plan shows the parts and what to change)")
        return None
    if getattr(training_args, "ignore_memory_plan", False):
        logger.warning("The memory plan says this run does not fit (%s); going on because of --ignore_memory_plan",
                       summary_line(plan))
        return None
    advice = "; ".join(f"{item['change']} ({item['how']}): {item['peak_bytes'] / 2 ** 30:.1f} GB"
                       for item in plan.advice) or "no single change considered fits: a larger GPU"
    return (f"the memory plan needs {plan.peak_bytes / 2 ** 30:.1f} GB per GPU, more than the "
            f"{plan.memory_bytes / 2 ** 30:.1f} GB of {plan.card.name if plan.card else 'this device'}: stopped before "
            f"loading the model. Changes that fit: {advice}. --plan prints the whole plan; "
            f"--ignore_memory_plan runs anyway")


__all__ = ["plan_for", "print_plan", "check_memory_before_loading", "memory_check_applies", "planned_card",
           "PlanInputError"]
