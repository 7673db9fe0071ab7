# Shared mechanics of the scripts/finetune_*.sh launchers, which source this file after setting
# their variables; it defines functions and does nothing on its own. The functions read the
# launcher's variables (USE_CPU, PRECISION, NUM_GPUS, ...) and set arrays that the launcher puts
# into its command, or run that command.

# DEVICE_ARGS: --use_cpu under USE_CPU=1 (DeepSpeed then uses its CPU accelerator), and --bf16 or
# --fp16 for PRECISION. PRECISION=auto becomes fp32 on the CPU, else bf16 where the GPU supports it,
# fp16 where not. Any other PRECISION than bf16, fp16, fp32 or auto stops the launcher (exit 2).
set_device_args() {
    DEVICE_ARGS=()
    if [ "$USE_CPU" = 1 ]; then
        export DS_ACCELERATOR=cpu
        DEVICE_ARGS+=(--use_cpu)
        if [ "$PRECISION" = auto ]; then PRECISION=fp32; fi
    elif [ "$PRECISION" = auto ]; then
        PRECISION=$(python3 -c "import torch; print('bf16' if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else 'fp16')")
    fi
    case "$PRECISION" in
        bf16) DEVICE_ARGS+=(--bf16) ;;
        fp16) DEVICE_ARGS+=(--fp16) ;;
        fp32) ;;
        *) echo "PRECISION must be bf16, fp16, fp32 or auto, got '$PRECISION'" >&2; exit 2 ;;
    esac
}

# LAUNCHER_ARGS for the deepspeed launcher: NUM_GPUS, then HOSTFILE (several nodes, DeepSpeed's
# "host slots=N" lines), MASTER_ADDR and MASTER_PORT where they are set.
set_deepspeed_launcher_args() {
    LAUNCHER_ARGS=(--num_gpus="$NUM_GPUS")
    if [ -n "${HOSTFILE:-}" ]; then LAUNCHER_ARGS+=(--hostfile "$HOSTFILE"); fi
    if [ -n "${MASTER_ADDR:-}" ]; then LAUNCHER_ARGS+=(--master_addr "$MASTER_ADDR"); fi
    if [ -n "${MASTER_PORT:-}" ]; then LAUNCHER_ARGS+=(--master_port "$MASTER_PORT"); fi
}

# EXTRA: EXTRA_ARGS split like shell words (quotes group words, $VARIABLES expand); with VAL_SIZE
# (a count or a fraction of the training file, held out with finetune.py --val_size) also the
# flags that evaluate on it at every SAVE_INTERVAL and at the end.
set_extra_args() {
    eval "EXTRA=(${EXTRA_ARGS:-})"
    if [ -n "${VAL_SIZE:-}" ]; then
        EXTRA=(--val_size "$VAL_SIZE" --do_eval --eval_strategy steps --eval_steps "${SAVE_INTERVAL:-500}" "${EXTRA[@]}")
    fi
}

# The arguments as one line of shell words (each quoted where it needs it, a space after each).
shell_quoted() {
    printf '%q ' "$@"
}

# run_logged OUTPUT_DIR COMMAND...: creates OUTPUT_DIR and runs COMMAND, its output (stdout and
# stderr) shown and appended to OUTPUT_DIR/train.log, so a resumed run continues the same log.
run_logged() {
    local output_dir=$1
    shift
    mkdir -p "$output_dir"
    "$@" 2>&1 | tee -a "$output_dir/train.log"
}

# launch OUTPUT_DIR COMMAND...: prints COMMAND once, after a "+ " like a set -x trace; with DRY_RUN=1
# stops there (exit 0), otherwise runs it with run_logged.
launch() {
    echo "+ $(shell_quoted "${@:2}")"
    if [ "${DRY_RUN:-0}" = 1 ]; then exit 0; fi
    run_logged "$@"
}
