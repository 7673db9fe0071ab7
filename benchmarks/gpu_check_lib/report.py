"""The GPU check's verdicts and its table: plain data in, plain data out (no model, no process), so
each rule is easy to read and to test."""

from __future__ import annotations

import math
import statistics

# A checkpoint may hold, per trainable parameter: its weight twice at up to 4 bytes (DeepSpeed's module
# state and the consolidated model beside it) and AdamW's fp32 master weight and two moments (12 bytes).
CHECKPOINT_BYTES_PER_TRAINABLE = 2 * 4 + 12
CHECKPOINT_SLACK_BYTES = 2 << 20  # RNG states, scheduler, trainer state, training arguments
# bf16 (or fp32 on the CPU) losses of one packed row and the same records padded: their sums run in
# another order and through other kernels, nothing more.
PACKED_LOSS_TOLERANCE = {"gpu": 0.02, "cpu": 0.02, "dry": 1e-4}
# The --cpu rehearsal took about 90 minutes on a CPU multiplying bf16 at about 10 GFLOP/s; its time
# scales with that rate, which a CPU without a fast bf16 path (AVX2 only) has 30 times lower.
CPU_REHEARSAL_MINUTES, CPU_REHEARSAL_FLOPS = 90, 10e9


def slow_cpu_warning(mode_name: str, peak_flops: float | None) -> str | None:
    """For the --cpu rehearsal on a CPU whose bf16 matmul rate would stretch it past a few hours: how long
    it would take, and what to do instead."""
    if mode_name != "cpu" or not peak_flops:
        return None
    hours = CPU_REHEARSAL_MINUTES / 60 * CPU_REHEARSAL_FLOPS / peak_flops
    if hours < 4:
        return None
    return (f"warning: this CPU multiplies bf16 matrices at {flops_rate(peak_flops)}, so the rehearsal would take "
            f"about {hours:.0f} hours (about {CPU_REHEARSAL_MINUTES} minutes at {flops_rate(CPU_REHEARSAL_FLOPS)}): "
            f"run --cpu on a CPU with AVX-512, or fewer cases with --cases (docs/gpu-check.md)")


def new_row(case: str, method: str, shape: str, attention: str, tokens: int) -> dict:
    return {"case": case, "status": "ok", "reason": "", "method": method, "model": shape, "attention": attention,
            "tokens_per_step": tokens, "peak_bytes": None, "peak_rss_bytes": None, "planned_bytes": None, "planned_total_bytes": None,
            "saved": False, "resumed": False, "inference": False, "server": None, "step_s": None,
            "tokens_per_s": None, "mfu": None, "losses": {}, "trainable_parameters": None, "checkpoint_bytes": None,
            "checkpoint_limit_bytes": None, "seconds": None, "problems": []}


def fail(row: dict, problem: str) -> None:
    row["problems"].append(problem)


def finish(row: dict, seconds: float) -> dict:
    row["seconds"] = round(seconds, 1)
    if row["problems"]:
        row["status"], row["reason"] = "failed", "; ".join(row["problems"])
    return row


# --- rules --------------------------------------------------------------------------------------------
def loss_problem(losses: dict[int, float], expected_steps: int) -> str | None:
    """Every step logged and finite, and the last (resumed) step's loss below the first's."""
    if sorted(losses) != list(range(1, expected_steps + 1)):
        return f"losses logged for steps {sorted(losses)}, expected 1..{expected_steps}"
    bad = {step: loss for step, loss in losses.items() if not math.isfinite(loss)}
    if bad:
        return f"non-finite loss at step {min(bad)} ({bad[min(bad)]})"
    first, last = losses[1], losses[expected_steps]
    if expected_steps > 1 and not last < first:
        return f"the loss did not fall: step 1 {first:.4f}, step {expected_steps} {last:.4f}"
    return None


def packed_problem(packed: dict[int, float], unpacked: dict[int, float], tolerance: float) -> str | None:
    """Each step's loss of a packed row equals that of the same records in a padded batch."""
    if not packed or sorted(packed) != sorted(unpacked):
        return f"losses to compare: packed at steps {sorted(packed)}, unpacked at steps {sorted(unpacked)}"
    for step in sorted(packed):
        a, b = packed[step], unpacked[step]
        if not (math.isfinite(a) and math.isfinite(b)) or abs(a - b) > tolerance:
            return f"step {step}: packed loss {a:.5f} differs from unpacked {b:.5f} by more than {tolerance:g}"
    return None


def checkpoint_limit(trainable: int) -> int:
    return trainable * CHECKPOINT_BYTES_PER_TRAINABLE + CHECKPOINT_SLACK_BYTES


def checkpoint_problem(checkpoint_bytes: int | None, trainable: int | None) -> str | None:
    if checkpoint_bytes is None:
        return "no checkpoint was written"
    if trainable is None:
        return "the trainer did not log its number of trainable parameters"
    limit = checkpoint_limit(trainable)
    if checkpoint_bytes > limit:
        return (f"checkpoint of {checkpoint_bytes / 1e6:.1f} MB, more than its {trainable:,} trainable parameters "
                f"and their optimizer state allow ({limit / 1e6:.1f} MB): frozen weights saved?")
    return None


def step_seconds(step_ends: list[float], first_forward: float | None) -> float | None:
    """The median time between optimizer steps after the first; with one step, from the first
    forward to its end (warm-up included)."""
    if len(step_ends) >= 2:
        return statistics.median(b - a for a, b in zip(step_ends, step_ends[1:]))
    if step_ends and first_forward is not None:
        return step_ends[0] - first_forward
    return None


# --- the table ---------------------------------------------------------------------------------------
def gigabytes(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 1e9:.2f}"


def flops_rate(value: float | None) -> str:
    if value is None:
        return "n/a"
    if value >= 1e12:
        return f"{value / 1e12:.1f} TFLOP/s"
    return f"{value / 1e9:.0f} GFLOP/s" if value >= 10e9 else f"{value / 1e9:.1f} GFLOP/s"


def rate(value: float | None) -> str:
    """Tokens/s with three significant digits at most: 0.31 on a CPU at 6B, 4096 on a GPU."""
    if value is None:
        return "n/a"
    return f"{value:.2f}" if value < 10 else f"{value:.1f}" if value < 100 else f"{value:.0f}"


def yes(value) -> str:
    return "-" if value is None else "yes" if value else "NO"


COLUMNS = [("case", 18), ("status", 7), ("peak GB", 11), ("planned GB", 10), ("saved", 5), ("resumed", 7),
           ("inference", 9), ("server", 6), ("step s", 7), ("tokens/s", 8), ("MFU", 6), ("time s", 6)]


def _line(cells: list[str]) -> str:
    return "  ".join(f"{c:<{w}}" if i < 2 else f"{c:>{w}}" for i, (c, (_, w)) in enumerate(zip(cells, COLUMNS)))


def table_header(mode: str) -> str:
    names = [name for name, _ in COLUMNS]
    names[2] = "peak GB" if mode == "gpu" else "peak RSS GB"
    header = _line(names)
    return header + "\n" + "-" * len(header)


def table_line(r: dict, mode: str) -> str:
    """A case's line: on a GPU the training peak (max_memory_allocated), on a CPU the case's largest RSS."""
    if r["status"] == "skipped":
        return _line([r["case"], r["status"]] + ["-"] * (len(COLUMNS) - 2))
    measured = r["peak_bytes"] if mode == "gpu" else r["peak_rss_bytes"]
    return _line([r["case"], r["status"], gigabytes(measured), gigabytes(r["planned_bytes"]), yes(r["saved"]),
                  yes(r["resumed"]), yes(r["inference"]), yes(r["server"]),
                  "n/a" if r["step_s"] is None else f"{r['step_s']:.2f}",
                  rate(r["tokens_per_s"]),
                  "n/a" if r["mfu"] is None else f"{r['mfu']:.1%}",
                  "n/a" if r["seconds"] is None else f"{r['seconds']:.0f}"])


def table(rows: list[dict], mode: str) -> str:
    """One line per case; why a case failed or was skipped follows the table."""
    notes = [f"{r['case']}: {r['status']}: {r['reason']}" for r in rows if r["reason"]]
    return "\n".join([table_header(mode)] + [table_line(r, mode) for r in rows] + ([""] + notes if notes else []))
