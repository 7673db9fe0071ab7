"""The memory and time plan of a run: one training step of the run's own code simulated on fake tensors.

- `run_plan`: `print_plan` (finetune.py --plan / --plan_json), `check_memory_before_loading` (every GPU run);
- `inputs`: the run read from finetune.py's parsed options (`run_spec`); `spec`: `RunSpec`, the batch;
- `build`, `fake_tensors`, `quantized`: the run's model with no memory behind its weights;
- `step`, `simulate`, `ledger`: the steady-state step and the storage-level accounting of its tensors;
- `measured`: the same step with real tensors, its peak read from the CPU allocator (validation);
- `deepspeed_rules`: ZeRO's partitions, offload and buffers; `flops`, `cards`: time;
- `host_disk`: host memory at load and disk per checkpoint; `advice`: what to change to fit;
- `planner`: the plan; `report`: in words, one line, JSON.
"""

from .inputs import PlanInputError
from .run_plan import check_memory_before_loading, plan_for, print_plan

__all__ = ["PlanInputError", "check_memory_before_loading", "plan_for", "print_plan"]
