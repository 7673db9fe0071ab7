"""A plan in words (`plan_text`), in one line (`summary_line`) and as JSON (`plan_json`).

Sizes are printed in GB of 2^30 bytes, the unit GPU memory is sold in (a "24 GB" card).
"""

from __future__ import annotations

from .cards import GIB
from .planner import Plan

PART_NAMES = {
    "weights": "weights (frozen)", "trainable": "trainable parameters", "gradients": "gradients",
    "optimizer_states": "optimizer states", "inputs": "inputs and buffers",
    "activations_saved": "activations saved for the backward", "activations_transient": "activations, transient",
    "logits_and_loss": "logits and loss",
}
METHODS = {"full": "full fine-tuning", "ptuning": "P-Tuning v2", "lora": "LoRA"}


def gb(value: float) -> str:
    """Bytes as GB (2^30), or MB below a tenth of a GB so that small parts do not read as zero."""
    if abs(value) < 0.1 * GIB:
        return f"{value / 2 ** 20:.0f} MB" if abs(value) >= 2 ** 20 or value == 0 else f"{value / 2 ** 20:.2f} MB"
    return f"{value / GIB:.1f} GB"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def verdict(plan: Plan, memory: int | None = None) -> str:
    memory = plan.memory_bytes if memory is None else memory
    spare = memory - plan.peak_bytes
    return f"fits, {gb(spare)} to spare" if spare >= 0 else f"does not fit ({gb(-spare)} over)"


def method_text(plan: Plan) -> str:
    spec = plan.spec
    text = METHODS[spec.method]
    if spec.method == "ptuning":
        text += f" (pre_seq_len {spec.pre_seq_len}{', projection' if spec.prefix_projection else ''})"
    if spec.method == "lora":
        text += f" (rank {spec.lora_rank} on {spec.lora_target})"
    if spec.quantization_bit:
        text += f", {spec.quantization_bit}-bit base"
    return text


def batch_text(plan: Plan) -> str:
    spec, batch = plan.spec, plan.step.batch
    layout = (f"{batch['rows']} packed row of {batch['padded_length']} tokens ({len(batch['record_lengths'])} records)"
              if spec.packing else f"{batch['rows']} x {batch['padded_length']} tokens")
    switches = [f"accumulation {spec.grad_accum}",
                "gradient checkpointing" if spec.gradient_checkpointing else "no gradient checkpointing",
                f"loss at targets only, chunks of {spec.loss_chunk_size}" if spec.loss_on_targets_only else "full logits",
                f"{spec.mixed_precision} autocast" if spec.mixed_precision and not spec.deepspeed else None]
    return f"micro-batch {layout}, {batch['supervised_tokens']} targets; " + ", ".join(s for s in switches if s)


def summary_line(plan: Plan) -> str:
    """The plan in one line (what every GPU run prints at its start)."""
    where = plan.card.name if plan.card else "the CPU"
    timing = plan.time.get("planned")
    speed = f"; >= {_duration(timing['seconds_per_step'])}/step" if timing else ""
    if timing and plan.spec.steps:
        speed += f", >= {_duration(timing['seconds_for_run'])} for {plan.spec.steps} steps"
    return (f"Memory plan: {gb(plan.peak_bytes)} per GPU at the peak of a step; {where} ({gb(plan.memory_bytes)}): "
            f"{verdict(plan)}{speed}")


def plan_text(plan: Plan) -> str:
    spec, step = plan.spec, plan.step
    config = spec.config
    lines = [
        f"Memory plan for {method_text(plan)} on {spec.model_path} ({getattr(config, 'model_type', '?')}, "
        f"{plan.params['total'] / 1e9:.2f}B parameters, {plan.params['trainable'] / 1e6:.2f}M trainable, "
        f"{config.num_hidden_layers} layers), weights in {str(spec.weights_dtype).replace('torch.', '')}, "
        f"{spec.world_size} process{'es' if spec.world_size > 1 else ''} ({spec.nodes} node{'s' if spec.nodes > 1 else ''})",
        f"  {batch_text(plan)}",
        f"  rows planned for: {spec.rows_source}",
        f"  simulated: one training step on fake tensors ({step.depth} depth, {step.seconds:.0f} s)",
        "",
        f"Peak on one GPU: {gb(plan.peak_bytes)}, {plan.moment}",
    ]
    width = max(len(PART_NAMES.get(name, name)) for name in plan.parts)
    for name, size in plan.parts.items():
        lines.append(f"  {PART_NAMES.get(name, name):<{width}}  {gb(size):>9}")
    lines.append(f"  {'= the step' + chr(39) + 's tensors':<{width}}  {gb(plan.tensor_peak_bytes):>9}"
                 f"   (what torch.cuda.max_memory_allocated would show)")
    for note in plan.deepspeed_notes + plan.notes:
        lines.append(f"  note: {note}")
    lines.append("")
    if plan.card:
        lines.append(f"Verdict for {plan.card.name} ({gb(plan.memory_bytes)}, {plan.card_source}): {verdict(plan)}")
    else:
        lines.append(f"Verdict for this machine's memory ({gb(plan.memory_bytes)}, a CPU run): {verdict(plan)}")
    lines.append(f"  {'card':<14} {'memory':>8}  {'verdict':<26} {'time/step':>10}  {'run':>8}")
    for card in plan.cards:
        lines.append(f"  {card['card']:<14} {gb(card['memory_bytes']):>8}  {verdict(plan, card['memory_bytes']):<26} "
                     f"{_duration(card['seconds_per_step']):>10}  {_duration(card['seconds_for_run']):>8}")
    time = plan.time
    steps = (f"{time['steps']} steps" if time["steps"]
             else "steps unknown (no data to count the epochs in: --max_steps sets them)")
    lines += [
        "",
        f"Time: {time['flops_per_step'] / 1e12:.1f} TFLOP per optimizer step and GPU ({spec.grad_accum} micro-batch"
        f"{'es' if spec.grad_accum > 1 else ''} of {spec.micro_batch} {'packed row' if spec.packing else 'record'}"
        f"{'s' if spec.micro_batch > 1 else ''} at the data's typical record length, recomputation included), "
        f"{steps}; at the card's bf16 matmul rate (data sheet, or measured on a visible GPU): "
        f"a lower bound, real steps reach about half to three quarters of it",
        f"Host memory at load: {gb(plan.host['per_process_bytes'])} per process, {gb(plan.host['per_node_bytes'])} per "
        f"node ({plan.host['how']})",
    ]
    if plan.host.get("offload_per_node_bytes"):
        lines.append(f"  plus {gb(plan.host['offload_per_node_bytes'])} per node while training (DeepSpeed offload)")
    disk = plan.disk
    parts = ", ".join(f"{name} {gb(size)}" for name, size in disk["per_checkpoint"].items())
    lines.append(f"Disk: {gb(disk['per_checkpoint_bytes'])} per checkpoint ({parts}); {disk['checkpoints_written']} "
                 f"written, {disk['checkpoints_kept']} kept, with the final model {gb(disk['run_bytes'])} for the run"
                 + (f" (plus one every {disk['save_every_minutes']:g} minutes)" if disk["save_every_minutes"] else ""))
    if not plan.fits:
        lines.append("")
        if plan.advice:
            lines.append(f"To fit {gb(plan.memory_bytes)}, the cheapest changes, each planned on its own:")
            for item in plan.advice:
                lines.append(f"  {item['change']}: peak {gb(item['peak_bytes'])}  ->  {item['how']}")
        else:
            lines.append("No change considered here makes it fit (see docs/memory-plan.md): a larger GPU.")
    return "\n".join(lines)


def plan_json(plan: Plan) -> dict:
    spec = plan.spec
    return {
        "peak_bytes": plan.peak_bytes, "tensor_peak_bytes": plan.tensor_peak_bytes, "parts": plan.parts,
        "moment": plan.moment, "gpu_memory_bytes": plan.memory_bytes if plan.card else None,
        "memory_bytes": plan.memory_bytes, "fits": plan.fits, "card": plan.card.name if plan.card else None,
        "card_source": plan.card_source, "method": spec.method, "params": plan.params,
        "batch": {key: value for key, value in plan.step.batch.items() if key != "record_lengths"},
        "processes": spec.world_size, "zero_stage": spec.zero_stage, "simulated_depth": plan.step.depth,
        "rows_source": spec.rows_source, "time": plan.time, "cards": plan.cards, "host": plan.host, "disk": plan.disk,
        "advice": plan.advice, "notes": plan.deepspeed_notes + plan.notes,
    }


__all__ = ["plan_text", "plan_json", "summary_line", "verdict", "gb"]
