# shellcheck shell=bash
# launch/common.sh: the body of every SLURM launcher in launch/ (pretrain_7b.sh and friends source it after their
# #SBATCH header and set MF_PRESET). It owns: the environment contract (below), the resolved config, the torchrun
# command every node runs (c10d rendezvous on the first node), forwarding of the stop signal to every rank, the
# requeue-or-not decision after the job step, automatic resume (checkpoint.load=auto), and --dry-run.
#
#   sbatch launch/pretrain_7b.sh [--dry-run] [section.key=value ...]     (bash launch/pretrain_7b.sh --dry-run works
#                                                                          outside an allocation too)
# Environment:
#   DATA_PATHS        required: dataset prefixes (folders holding manifest.json), separated by commas or spaces;
#                     `synthetic` trains on generated data (a smoke test of a new cluster)
#   RUN_DIR           required: training.run_dir (metrics, TensorBoard, config.yaml, last_exit.json), on a file
#                     system every node sees
#   CKPT_DIR          checkpoint.save_dir (default RUN_DIR/checkpoints); every start resumes from its latest
#   DATA_WEIGHTS      data.weights, one per DATA_PATHS entry (default: proportional to size)
#   MEGAFUSION_CONFIG a preset name or YAML file replacing the launcher's preset (e.g. tiny, for tests)
#   TRAIN_OVERRIDES   extra dotlist overrides, space separated (arguments after the script name come last)
#   GPUS_PER_NODE     processes per node (default SLURM_GPUS_ON_NODE, else 8)
#   MASTER_PORT       rendezvous port on the first node (default 29500 + SLURM_JOB_ID % 1000)
#   STOP_GRACE_S      how long torchrun lets its workers save after a stop signal before it kills them (default
#                     900; SLURM's own kill at the time limit comes first when it is sooner)
#   REQUEUE           1 (default): `scontrol requeue` the job after a save-and-exit on SIGUSR1; 0: never
#   PYTHON, TORCHRUN  the interpreter and launcher to use (default: python and torchrun on PATH)
#
# Signals (docs/launch.md has the whole story). The sbatch header asks for `--signal=B:USR1@300`: 300 s before the
# time limit SLURM sends SIGUSR1 to this batch shell only. The shell traps it and forwards it with `kill -USR1` to
# its srun, which runs in the background (`srun ... &` then `wait`, since bash runs a trap only between commands);
# srun forwards it to the task on every node, torchrun; torchrun forwards it to its workers
# (--signals-to-handle ...,SIGUSR1) and gives them STOP_GRACE_S to exit (--shutdown-timeout). Every rank agrees on
# the step, saves a checkpoint and exits 0; rank 0 writes RUN_DIR/last_exit.json. torchrun itself exits non-zero
# after forwarding a signal, so the decision comes from that record, not from srun's status
# (python -m megafusion.training.exit_record): after SIGUSR1 (or training.exit_duration_minutes) with the step saved
# the job is requeued (`scontrol requeue $SLURM_JOB_ID`, needs --requeue) and the next start resumes from the
# latest checkpoint. SIGTERM (scancel) is forwarded the same way; the ranks save if they get the time and the job
# is not requeued. `scancel --signal=USR1 --batch JOBID` saves and requeues on demand.
#
# Exit status: 0 finished, stopped on purpose, or requeued; 1 the training step failed; 2 a usage or environment
# error (named, before anything starts).

MF_STOP_SIGNALS="SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"

# The resolved config, as `megafusion config --config PRESET OVERRIDES...` prints it (the same load_config + to_yaml,
# without the command line's imports of torch: a fraction of a second instead of several).
MF_RESOLVE_CONFIG='
import sys
from megafusion.config import load_config, to_yaml
try:
    print(to_yaml(load_config(sys.argv[1], sys.argv[2:])), end="")
except (ValueError, FileNotFoundError) as e:
    sys.exit(f"megafusion config: {e}")
'

mf_log() { printf 'megafusion launch: %s\n' "$*" >&2; }
mf_die() { printf 'megafusion launch: error: %s\n' "$*" >&2; exit 2; }

mf_usage() {
    cat <<EOF
usage: sbatch $0 [--dry-run] [section.key=value ...]
       bash $0 --dry-run [section.key=value ...]      (print the per-node commands and the resolved config)
Preset: ${MF_PRESET:-?} (MEGAFUSION_CONFIG replaces it). Required environment: DATA_PATHS, RUN_DIR.
Optional: CKPT_DIR, DATA_WEIGHTS, TRAIN_OVERRIDES, GPUS_PER_NODE, MASTER_PORT, STOP_GRACE_S, REQUEUE, PYTHON,
TORCHRUN. See launch/common.sh and docs/launch.md.
EOF
}

# "a,b c" -> "[a,b,c]" (a dotlist list value)
mf_list() {
    local items=() item out=""
    IFS=', ' read -r -a items <<< "$1"
    for item in "${items[@]}"; do
        if [ -n "$item" ]; then out="${out:+$out,}$item"; fi
    done
    printf '[%s]' "$out"
}

# The nodes of the allocation (one per line); outside an allocation, placeholders for --dry-run.
mf_hosts() {
    if [ -n "${SLURM_JOB_NODELIST:-}" ]; then
        scontrol show hostnames "$SLURM_JOB_NODELIST"
        return
    fi
    local n i
    n=${SLURM_JOB_NUM_NODES:-$(sed -n 's/^#SBATCH --nodes=\([0-9]*\).*/\1/p' "$0" | head -n1)}
    for ((i = 0; i < ${n:-1}; i++)); do echo "node$i"; done
}

mf_main() {
    local dry_run=0 arg
    local cli_overrides=()
    for arg in "$@"; do
        case "$arg" in
            --dry-run) dry_run=1 ;;
            -h | --help) mf_usage; exit 0 ;;
            -*) mf_usage >&2; mf_die "unknown option $arg (only --dry-run; overrides look like section.key=value)" ;;
            *) cli_overrides+=("$arg") ;;
        esac
    done

    # ---- environment contract: everything named before anything runs
    [ -n "${MF_PRESET:-}" ] || mf_die "MF_PRESET is unset: source launch/common.sh from a launcher such as launch/pretrain_7b.sh"
    [ -n "${DATA_PATHS:-}" ] || mf_die "DATA_PATHS is not set: export DATA_PATHS=/data/ds1,/data/ds2 (preprocessed dataset folders) or DATA_PATHS=synthetic for generated data"
    [ -n "${RUN_DIR:-}" ] || mf_die "RUN_DIR is not set: export RUN_DIR=/shared/runs/NAME (training.run_dir, on a file system every node sees)"
    local python=${PYTHON:-python} torchrun=${TORCHRUN:-torchrun}
    command -v "$python" > /dev/null || mf_die "PYTHON=$python is not an executable on PATH: activate the environment that has megafusion, or set PYTHON"
    local grace=${STOP_GRACE_S:-900} gpus=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}} requeue=${REQUEUE:-1}
    [[ "$grace" =~ ^[0-9]+$ ]] || mf_die "STOP_GRACE_S=$grace is not a whole number of seconds"
    [[ "$gpus" =~ ^[0-9]+$ && "$gpus" -ge 1 ]] || mf_die "GPUS_PER_NODE=$gpus is not a positive whole number"
    [[ "$requeue" == 0 || "$requeue" == 1 ]] || mf_die "REQUEUE=$requeue must be 0 or 1"
    local config=${MEGAFUSION_CONFIG:-$MF_PRESET}
    local run_dir ckpt_dir
    run_dir=$(realpath -m "$RUN_DIR")
    ckpt_dir=$(realpath -m "${CKPT_DIR:-$run_dir/checkpoints}")

    # ---- the config: preset, then the paths from the environment, TRAIN_OVERRIDES, the arguments; resume last
    local overrides=() extra=()
    if [ "$DATA_PATHS" = synthetic ]; then
        overrides+=("data.paths=[]")
    else
        overrides+=("data.paths=$(mf_list "$DATA_PATHS")")
    fi
    [ -z "${DATA_WEIGHTS:-}" ] || overrides+=("data.weights=$(mf_list "$DATA_WEIGHTS")")
    overrides+=("training.run_dir=$run_dir" "checkpoint.save_dir=$ckpt_dir")
    read -r -a extra <<< "${TRAIN_OVERRIDES:-}"
    overrides+=("${extra[@]}" "${cli_overrides[@]}" "checkpoint.load=auto")

    # ---- nodes and the rendezvous
    local hosts=()
    mapfile -t hosts < <(mf_hosts)
    if [ -z "${SLURM_JOB_NODELIST:-}" ] && [ "$dry_run" = 0 ]; then
        mf_die "not inside a SLURM allocation (SLURM_JOB_NODELIST is unset): submit with \`sbatch $0\`, or add --dry-run to see the commands"
    fi
    [ "${#hosts[@]}" -ge 1 ] || mf_die "\`scontrol show hostnames \$SLURM_JOB_NODELIST\` listed no node (SLURM_JOB_NODELIST=${SLURM_JOB_NODELIST:-})"
    local nnodes=${#hosts[@]}
    local master_addr=${hosts[0]}
    local master_port=${MASTER_PORT:-$((29500 + ${SLURM_JOB_ID:-0} % 1000))}
    local job_id=${SLURM_JOB_ID:-none}

    # ---- process environment (exported: srun passes it to every node)
    export CUDA_DEVICE_MAX_CONNECTIONS=1        # one hardware queue: TP/SP communication overlaps compute in issue order (Megatron-LM)
    export TORCH_NCCL_ASYNC_ERROR_HANDLING=1    # a failed or timed-out collective aborts the process instead of hanging
    export NCCL_ASYNC_ERROR_HANDLING=1          # the same for torch < 2.2
    export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
    export PYTHONUNBUFFERED=1                   # log lines reach the job log as they happen
    local cpus=${SLURM_CPUS_ON_NODE:-$(nproc)}
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$((cpus / gpus > 0 ? cpus / gpus : 1))}
    # Fabric settings are cluster-specific; typical InfiniBand ones:
    # export NCCL_IB_HCA=mlx5                   # the HCAs to use
    # export NCCL_IB_GID_INDEX=3                # RoCE
    # export NCCL_SOCKET_IFNAME=ib0             # bootstrap interface (not docker0/lo)
    # export NCCL_IB_TIMEOUT=22                 # longer IB retransmission timeout on large fabrics
    # export NCCL_NVLS_ENABLE=0                 # if NVLink SHARP misbehaves
    MEGAFUSION_LAUNCH_ID="$job_id.${SLURM_RESTART_COUNT:-0}.$(date +%s).$$"   # matched in last_exit.json
    export MEGAFUSION_LAUNCH_ID

    local node_cmd=("$torchrun" "--nnodes=$nnodes" "--nproc-per-node=$gpus" "--rdzv-backend=c10d"
        "--rdzv-endpoint=$master_addr:$master_port" "--rdzv-id=megafusion-$job_id" "--max-restarts=0"
        "--signals-to-handle=$MF_STOP_SIGNALS" "--shutdown-timeout=$grace"
        -m megafusion.cli train --config "$config" "${overrides[@]}")
    local srun_cmd=(srun "--nodes=$nnodes" --ntasks-per-node=1 --kill-on-bad-exit=1 --cpu-bind=none)
    [ -z "${SLURM_CPUS_ON_NODE:-}" ] || srun_cmd+=("--cpus-per-task=$SLURM_CPUS_ON_NODE")
    srun_cmd+=("${node_cmd[@]}")

    mf_log "job $job_id (restart ${SLURM_RESTART_COUNT:-0}): $nnodes node(s) x $gpus process(es), config $config, run $run_dir, checkpoints $ckpt_dir"
    if [ "$dry_run" = 1 ]; then
        echo "# environment"
        local var
        for var in CUDA_DEVICE_MAX_CONNECTIONS TORCH_NCCL_ASYNC_ERROR_HANDLING NCCL_ASYNC_ERROR_HANDLING NCCL_DEBUG \
            PYTHONUNBUFFERED OMP_NUM_THREADS MEGAFUSION_LAUNCH_ID; do
            echo "export $var=${!var}"
        done
        echo "# the batch shell runs (in the background, forwarding SIGUSR1/SIGTERM to it):"
        printf '%q ' "${srun_cmd[@]}"; echo
        local i
        for i in "${!hosts[@]}"; do
            echo "# node $i (${hosts[$i]}, SLURM_NODEID=$i) runs:"
            printf '%q ' "${node_cmd[@]}"; echo
        done
        echo "# resolved config (megafusion config --config $config OVERRIDES...):"
        "$python" -c "$MF_RESOLVE_CONFIG" "$config" "${overrides[@]}" || mf_die "the config above does not resolve; fix the preset, TRAIN_OVERRIDES or the arguments"
        return 0
    fi

    # ---- from here on a stop signal is ours to handle (before the job step starts it is only recorded)
    MF_SRUN_PID=""
    MF_FORWARDED=""
    trap 'mf_forward USR1' USR1
    trap 'mf_forward TERM' TERM

    # ---- check before the allocation's GPUs spin up: the config resolves, torchrun can forward the stop signal
    command -v "$torchrun" > /dev/null || mf_die "TORCHRUN=$torchrun is not an executable on PATH: activate the environment that has torch, or set TORCHRUN"
    mkdir -p "$run_dir" || mf_die "RUN_DIR=$run_dir: cannot create it"
    "$python" -c "$MF_RESOLVE_CONFIG" "$config" "${overrides[@]}" > "$run_dir/launch-config.yaml" \
        || mf_die "the config does not resolve (message above); fix the preset, TRAIN_OVERRIDES or the arguments"
    grep -q -- --shutdown-timeout <<< "$("$torchrun" --help 2> /dev/null)" \
        || mf_die "$torchrun has no --signals-to-handle/--shutdown-timeout (they need torch >= 2.12): its agent would die on SIGUSR1 or kill the workers 30 s into a save; use a newer torch (the Dockerfile's image)"
    mf_log "resolved config: $run_dir/launch-config.yaml"
    mf_log "node command: $(printf '%q ' "${node_cmd[@]}")"

    if [ -n "$MF_FORWARDED" ]; then  # a signal before the step started: do not start it
        mf_log "SIG$MF_FORWARDED arrived before the job step started: not starting it"
        if [ "$MF_FORWARDED" = USR1 ] && [ "$requeue" = 1 ] && [ -n "${SLURM_JOB_ID:-}" ]; then
            scontrol requeue "$SLURM_JOB_ID" || true
        fi
        exit 1
    fi

    # ---- the job step, in the background so that the traps run while it is going
    "${srun_cmd[@]}" &
    MF_SRUN_PID=$!
    local rc
    mf_wait_step
    rc=$MF_STEP_RC
    trap '' USR1  # a warning that comes after the step ended has nothing left to stop
    mf_log "job step ended with status $rc${MF_FORWARDED:+ after SIG$MF_FORWARDED was forwarded}"

    # ---- what next: the trainer's exit record decides (torchrun's status cannot tell a clean save from a crash)
    local verdict="" why=""
    read -r verdict why < <("$python" -m megafusion.training.exit_record --run-dir "$run_dir" \
        --launch-id "$MEGAFUSION_LAUNCH_ID") || true
    [ -n "$verdict" ] || { verdict=failed; why="python -m megafusion.training.exit_record printed nothing"; }
    mf_log "$verdict: $why"
    case "$verdict" in
        requeue)
            if [ "$requeue" = 1 ] && [ -n "${SLURM_JOB_ID:-}" ]; then
                mf_log "requeueing job $SLURM_JOB_ID: the next start resumes from $ckpt_dir (checkpoint.load=auto)"
                scontrol requeue "$SLURM_JOB_ID" \
                    || { mf_log "error: \`scontrol requeue $SLURM_JOB_ID\` failed: submit with --requeue (the launchers' header has it) or ask for JobRequeue=1; resubmit by hand to resume"; exit 1; }
            else
                mf_log "not requeued (REQUEUE=$requeue, SLURM_JOB_ID=${SLURM_JOB_ID:-unset}); resubmit to resume"
            fi
            exit 0 ;;
        done | stop) exit 0 ;;
        *) exit $((rc == 0 ? 1 : rc)) ;;
    esac
}

# Trap handler: pass the signal on to srun, which forwards it to the task (torchrun) on every node.
mf_forward() {
    MF_FORWARDED=$1
    MF_INTERRUPTED=1
    if [ -n "${MF_SRUN_PID:-}" ]; then
        mf_log "received SIG$1: forwarding it to the job step (srun pid $MF_SRUN_PID); every rank saves a checkpoint and exits"
        kill -s "$1" "$MF_SRUN_PID" 2> /dev/null || true
    else
        mf_log "received SIG$1 before the job step started"
    fi
}

# Wait for srun through any number of trapped signals (each one ends `wait` early); sets MF_STEP_RC.
mf_wait_step() {
    local status previous=""
    while :; do
        MF_INTERRUPTED=0
        status=0
        wait "$MF_SRUN_PID" || status=$?
        if [ "$MF_INTERRUPTED" = 1 ] && [ "$status" -gt 128 ]; then
            previous=$status
            continue
        fi
        # 127: srun had already been waited for (its own status was > 128 when a signal came in): keep that one
        if [ "$status" = 127 ] && [ -n "$previous" ]; then status=$previous; fi
        MF_STEP_RC=$status
        return
    done
}
