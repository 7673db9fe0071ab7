"""Training: the loss and what keeps a run safe.

- `supervised_loss`: the output layer and loss only at targets;
- `loss_switch`: `use_supervised_loss`, the switch models read, and the loss contract with the Trainer;
- `token_counts`: real and supervised tokens, counted on the device;
- `divergence`: a non-finite loss or gradient stops the run before anything non-finite is saved;
- `preemption`: SIGTERM/SIGINT save a checkpoint first; time-based saves;
- `run_record`: what a rerun may change; `output_folder`: writable, with room; `file_modes`: umask;
- `run_summary`: the summary a run ends with; `launch_workers`: torchrun for the launchers;
"""
