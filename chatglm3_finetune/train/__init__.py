"""Training: the loss and what keeps a run safe.

- `supervised_loss`: the output layer and loss only at targets;
- `loss_switch`: `use_supervised_loss`, the switch models read, and the loss contract with the Trainer;
- `token_counts`: real and supervised tokens, counted on the device;
- `divergence`: a non-finite loss or gradient stops the run before anything non-finite is saved;
- `preemption`: SIGTERM/SIGINT save a checkpoint first (or let the final save complete); time-based saves;
- `run_start`: where a run starts (refused, nothing to do, final model only, resume or fresh), decided once;
- `run_lock`: one run per output folder; `run_record`: what a rerun may change;
- `manifest`: sizes and checksums that make a checkpoint or the final model complete; `checkpoints`: the
  one to resume from, and the rotation; `final_model`: the final save, aside then moved into place;
- `output_folder`: apart from the inputs, writable, with room; `file_modes`: umask;
- `run_summary`: the summary a run ends with; `launch_workers`: torchrun for the launchers;
"""
