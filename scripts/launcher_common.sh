# The one launch function behind scripts/finetune_*.sh. A launcher sources this file (which moves
# to the project root, so relative paths are relative to it), sets its defaults with
# `defaults VAR=value ...` and calls `launch_finetune METHOD FORMAT "$@"`.
#
# Every variable can be set from the environment (an empty one counts as unset):
#   BASE_MODEL_PATH  a local model folder (default models/chatglm3-6b; nothing is downloaded)
#   DATASET_PATH, RUN_NAME, DEV_BATCH_SIZE, GRAD_ACCUMULARION_STEPS (the reference's spelling;
#   GRAD_ACCUMULATION_STEPS works too), LR, MAX_STEP, SAVE_INTERVAL, MAX_SEQ_LEN (multi-turn) or
#   MAX_SOURCE_LEN/MAX_TARGET_LEN (input-output), PRE_SEQ_LEN (P-Tuning), DS_CONFIG (DeepSpeed)
#   LOGGING_STEPS    log the loss every N steps (default 10)
#   VAL_SIZE         hold out part of DATASET_PATH, a count or a fraction (finetune.py --val_size,
#                    drawn with --seed), and evaluate on it every SAVE_INTERVAL steps and at the end
#   SAVE_EVERY_MINUTES  also save a checkpoint every M minutes (finetune.py --save_every_minutes;
#                    30 by default where finetune.py has that flag, 0 turns it off)
#   OUTPUT_DIR       default output/RUN_NAME-DATESTR-...; rerun with the same OUTPUT_DIR to resume
#                    (finetune.py continues from its newest checkpoint; train.log is appended to);
#                    a folder this try created is removed again if it failed leaving only its train.log
#   USE_CPU=1        train on the CPU; PRECISION=bf16|fp16|fp32|auto (auto: fp32 on the CPU, else
#                    bf16 where the GPU supports it, fp16 where not; bf16, said on stderr, where no
#                    GPU is visible, as on a login node)
#   SAVE_TOTAL_LIMIT keep at most this many checkpoint-N folders, the newest (finetune.py
#                    --save_total_limit; 2 for full fine-tuning, 3 for P-Tuning and LoRA; 0 keeps all)
#   EXTRA_ARGS       more finetune.py flags (or give them after the script's name), split like
#                    shell words: quotes group words ("--run_name 'two words'"); nothing in them is
#                    expanded or run
#   DRY_RUN=1        print the command (ready to paste) instead of running it
#   PLAN=1           print the run's memory and time plan (finetune.py --plan: peak GPU memory and its
#                    parts per process, time, host memory, disk, what to change to fit) instead of
#                    running it: one process on this machine, no GPU and no torchrun needed, the
#                    weights never loaded; NUM_GPUS/NNODES say how many processes to plan for
#   PYTHON           the interpreter (default: the active virtual environment's, else the
#                    project's .venv/bin/python, else python3); torchrun and DeepSpeed's launcher
#                    run as its modules, so nothing depends on PATH
# How the processes start:
#   NUM_GPUS=1 (and one node): one plain Python process, its exit code and messages as they are.
#   NUM_GPUS=N > 1: N workers on this machine through torchrun (chatglm3_finetune.train.launch_workers).
#   NNODES=M > 1, NODE_RANK, MASTER_ADDR, MASTER_PORT (default 29500), run on every node (or under
#   SLURM: `srun --ntasks-per-node=1 bash scripts/...`, which fills them from SLURM_NNODES,
#   SLURM_NODEID and the first host of SLURM_JOB_NODELIST): torchrun across the nodes, no ssh.
#   HOSTFILE (DeepSpeed's "host slots=N" lines): DeepSpeed's ssh launcher, started on one node.
# Several workers: a failed worker's own error is the last thing shown and its exit code is the
# launcher's; the workers die with their launcher (also under kill -9 of its process group).

set -eo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONUNBUFFERED=1  # the log reaches the terminal and train.log as it is written

fail() {
    echo "error: $*" >&2
    exit 2
}

# defaults VAR=value...: sets each VAR that is unset or empty.
defaults() {
    local pair name
    for pair in "$@"; do
        name=${pair%%=*}
        if [ -z "${!name:-}" ]; then printf -v "$name" %s "${pair#*=}"; fi
    done
}
if [ "${USE_CPU:-0}" = 1 ]; then defaults NUM_GPUS=1; fi  # one CPU process unless asked for more
defaults GRAD_ACCUMULARION_STEPS="${GRAD_ACCUMULATION_STEPS:-}"

find_python() {
    if [ -n "${PYTHON:-}" ]; then return; fi
    if [ -n "${VIRTUAL_ENV:-}" ] && [ -x "$VIRTUAL_ENV/bin/python" ]; then
        PYTHON=$VIRTUAL_ENV/bin/python
    elif [ -x .venv/bin/python ]; then
        PYTHON=.venv/bin/python
    else
        PYTHON=$(command -v python3) || fail "no Python: run 'bash scripts/setup.sh' (it creates .venv) or set PYTHON"
        "$PYTHON" -c "import torch, transformers, chatglm3_finetune" 2>/dev/null \
            || fail "no .venv here and $PYTHON lacks the requirements: run 'bash scripts/setup.sh' (it creates .venv), or set PYTHON to an interpreter that has them"
    fi
}

# whole_numbers VAR...: stops unless each VAR is a whole number of at least 1.
whole_numbers() {
    local name
    for name in "$@"; do
        [[ "${!name}" =~ ^[1-9][0-9]*$ ]] || fail "$name must be a whole number of at least 1, got '${!name}'"
    done
}

# DEVICE_ARGS: --use_cpu under USE_CPU=1 (DeepSpeed then uses its CPU accelerator), and --bf16 or
# --fp16 for PRECISION.
set_device_args() {
    DEVICE_ARGS=()
    if [ "$USE_CPU" = 1 ]; then
        export DS_ACCELERATOR=cpu
        DEVICE_ARGS+=(--use_cpu)
        if [ "$PRECISION" = auto ]; then PRECISION=fp32; fi
    elif [ "$PRECISION" = auto ]; then
        PRECISION=$("$PYTHON" -c "import torch; print(('bf16' if torch.cuda.is_bf16_supported() else 'fp16') if torch.cuda.is_available() else 'unseen')") \
            || fail "$PYTHON could not import torch to choose PRECISION=auto: run 'bash scripts/setup.sh'"
        if [ "$PRECISION" = unseen ]; then  # a login node: the GPUs that will train are elsewhere
            PRECISION=bf16
            echo "PRECISION=auto: no GPU visible here, assuming bf16 (Ampere or newer); set PRECISION=fp16 for V100/T4" >&2
        fi
    fi
    case "$PRECISION" in
        bf16) DEVICE_ARGS+=(--bf16) ;;
        fp16) DEVICE_ARGS+=(--fp16) ;;
        fp32) ;;
        *) fail "PRECISION must be bf16, fp16, fp32 or auto, got '$PRECISION'" ;;
    esac
}

# NNODES, NODE_RANK, MASTER_ADDR from SLURM's variables where SLURM started this script.
read_slurm_nodes() {
    defaults NNODES="${SLURM_NNODES:-${SLURM_JOB_NUM_NODES:-1}}" NODE_RANK="${SLURM_NODEID:-0}"
    if [ -z "${MASTER_ADDR:-}" ] && [ -n "${SLURM_JOB_NODELIST:-}" ] && command -v scontrol >/dev/null; then
        MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    fi
}

# LAUNCHER: what runs finetune.py with the flags given (see "How the processes start" above).
set_process_launcher() {
    read_slurm_nodes
    whole_numbers NUM_GPUS NNODES
    if [ -n "${HOSTFILE:-}" ]; then
        LAUNCHER=("$PYTHON" -m deepspeed.launcher.runner --num_gpus="$NUM_GPUS" --hostfile "$HOSTFILE")
        if [ -n "${MASTER_ADDR:-}" ]; then LAUNCHER+=(--master_addr "$MASTER_ADDR"); fi
        if [ -n "${MASTER_PORT:-}" ]; then LAUNCHER+=(--master_port "$MASTER_PORT"); fi
    elif [ "$NNODES" -gt 1 ]; then
        [ -n "${MASTER_ADDR:-}" ] || fail "NNODES=$NNODES needs MASTER_ADDR (the address of the node with NODE_RANK=0)"
        LAUNCHER=("$PYTHON" -m chatglm3_finetune.train.launch_workers --nnodes="$NNODES" --node_rank="$NODE_RANK"
                  --master_addr="$MASTER_ADDR" --master_port="${MASTER_PORT:-29500}" --nproc_per_node="$NUM_GPUS")
    elif [ "$NUM_GPUS" -gt 1 ]; then
        LAUNCHER=("$PYTHON" -m chatglm3_finetune.train.launch_workers --standalone --nnodes=1 --nproc_per_node="$NUM_GPUS")
    elif [[ " ${EXTRA[*]} $* " == *" --deepspeed "* ]]; then
        # DeepSpeed needs the variables torchrun would set, even for one process.
        LAUNCHER=(env RANK=0 LOCAL_RANK=0 WORLD_SIZE=1 MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
                  MASTER_PORT="${MASTER_PORT:-$(free_port)}" "$PYTHON")
    else
        LAUNCHER=("$PYTHON")
    fi
}

free_port() {
    "$PYTHON" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"
}

# EXTRA: EXTRA_ARGS split like shell words by Python's shlex (no eval: nothing is expanded or run).
set_extra_args() {
    EXTRA=()
    if [ -z "${EXTRA_ARGS:-}" ]; then return; fi
    mapfile -d '' -t EXTRA < <("$PYTHON" -c '
import shlex, sys
try:
    sys.stdout.write("".join(word + "\0" for word in shlex.split(sys.argv[1])))
except ValueError as e:
    sys.exit(f"error: EXTRA_ARGS: {e} (quote a word that holds spaces with matching quotes)")
' "$EXTRA_ARGS")
    wait $! || exit 2
}

# launch_finetune METHOD FORMAT [finetune.py flags...]: METHOD is full (DeepSpeed, DS_CONFIG),
# p-tuning (PRE_SEQ_LEN, QUANTIZATION_BIT) or lora (LORA_RANK, LORA_ALPHA, LORA_DROPOUT, LORA_TARGET,
# QUANTIZATION_BIT: 4 or 8 bits for the frozen base).
launch_finetune() {
    local method=$1 format=$2 suffix
    shift 2
    defaults USE_CPU=0 PRECISION=auto \
        BASE_MODEL_PATH=models/chatglm3-6b LOGGING_STEPS=10 NUM_GPUS=1 DATESTR="$(date +%Y%m%d-%H%M%S)"
    find_python
    local method_args length_args
    case "$method" in
        full)
            # a checkpoint holds weights and optimizer states: 14-16 bytes per parameter
            defaults DS_CONFIG=configs/ds_zero2.json SAVE_TOTAL_LIMIT=2
            method_args=(--deepspeed "$DS_CONFIG")
            suffix=$LR ;;
        p-tuning)
            method_args=(--pre_seq_len "$PRE_SEQ_LEN")
            suffix=$PRE_SEQ_LEN-$LR ;;
        lora)
            method_args=(--lora_rank "$LORA_RANK" --lora_alpha "$LORA_ALPHA" --lora_dropout "$LORA_DROPOUT"
                         --lora_target "$LORA_TARGET")
            suffix=r$LORA_RANK-$LR ;;
    esac
    defaults SAVE_TOTAL_LIMIT=3
    [[ "$SAVE_TOTAL_LIMIT" =~ ^[0-9]+$ ]] || fail "SAVE_TOTAL_LIMIT must be a whole number (0 keeps every checkpoint), got '$SAVE_TOTAL_LIMIT'"
    if [ "$SAVE_TOTAL_LIMIT" != 0 ]; then method_args+=(--save_total_limit "$SAVE_TOTAL_LIMIT"); fi
    if [ -n "${QUANTIZATION_BIT:-}" ]; then method_args+=(--quantization_bit "$QUANTIZATION_BIT"); fi
    case "$format" in
        input-output) length_args=(--max_source_length "$MAX_SOURCE_LEN" --max_target_length "$MAX_TARGET_LEN") ;;
        multi-turn) length_args=(--max_seq_length "$MAX_SEQ_LEN") ;;
        *) fail "FORMAT must be input-output or multi-turn, got '$format'" ;;
    esac
    # Time-based checkpoints wherever this finetune.py has them (--save_every_minutes); 0 turns them off.
    if grep -rqs save_every_minutes arguments.py chatglm3_finetune; then defaults SAVE_EVERY_MINUTES=30; fi
    if [ "${SAVE_EVERY_MINUTES:-0}" != 0 ]; then method_args+=(--save_every_minutes "$SAVE_EVERY_MINUTES"); fi
    if [ -n "${VAL_SIZE:-}" ]; then
        method_args+=(--val_size "$VAL_SIZE" --do_eval --eval_strategy steps --eval_steps "$SAVE_INTERVAL")
    fi
    defaults OUTPUT_DIR="output/$RUN_NAME-$DATESTR-$suffix"
    set_device_args
    set_extra_args
    set_process_launcher "${method_args[@]}" "$@"

    local command=("${LAUNCHER[@]}" finetune.py
        --do_train
        --train_format "$format"
        --train_file "$DATASET_PATH"
        "${length_args[@]}"
        --preprocessing_num_workers 1
        --model_name_or_path "$BASE_MODEL_PATH"
        --output_dir "$OUTPUT_DIR"
        --per_device_train_batch_size "$DEV_BATCH_SIZE"
        --gradient_accumulation_steps "$GRAD_ACCUMULARION_STEPS"
        --max_steps "$MAX_STEP"
        --logging_steps "$LOGGING_STEPS"
        --save_steps "$SAVE_INTERVAL"
        --learning_rate "$LR"
        --activation_checkpointing
        --ddp_find_unused_parameters false
        "${method_args[@]}" "${DEVICE_ARGS[@]}" "${EXTRA[@]}" "$@")
    if [ "${PLAN:-0}" = 1 ]; then  # one process plans each of the run's: finetune.py without its launcher
        command=("$PYTHON" "${command[@]:${#LAUNCHER[@]}}" --plan --plan_num_gpus "$NUM_GPUS" --plan_num_nodes "$NNODES")
    fi
    if [ "${DRY_RUN:-0}" = 1 ]; then
        printf '%q ' "${command[@]}" | sed 's/ $//'
        echo
        exit 0
    fi
    if [ "${PLAN:-0}" = 1 ]; then exec "${command[@]}"; fi
    echo "+ $(printf '%q ' "${command[@]}")" >&2
    local created=0 status=0
    if [ ! -e "$OUTPUT_DIR" ]; then created=1; fi
    mkdir -p "$OUTPUT_DIR"
    # tee outlives Ctrl-C and SIGTERM so it still logs what finetune.py prints while it stops.
    "${command[@]}" 2>&1 | (trap '' INT TERM; exec tee -a "$OUTPUT_DIR/train.log") || status=$?
    if [ "$status" != 0 ] && [ "$created" = 1 ]; then remove_if_only_the_log "$OUTPUT_DIR"; fi
    exit "$status"
}

# remove_if_only_the_log DIR: a folder this try created and that holds nothing but this try's
# train.log (finetune.py failed before writing anything) is removed, quietly: its error, shown
# above, stays the last thing on the screen.
remove_if_only_the_log() {
    if [ "$(ls -A "$1")" = train.log ]; then
        rm -f "$1/train.log" && rmdir "$1"
    fi
}
