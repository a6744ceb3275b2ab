# Sourced by the example scripts after they set ROOT (the repository root). Sets LAUNCH, JOB_ID and port.
# Under sbatch: `srun python` starts one task per GPU as the #SBATCH header asks (the code reads SLURM_* itself).
# Otherwise: torchrun on this machine with NGPU processes (default 8). Multi-node torchrun: start the script on
# every node with the same NNODES, RDZV_ENDPOINT (first node's host:port) and JOB_ID, e.g.
#   NNODES=4 NGPU=8 RDZV_ENDPOINT=node001:29400 JOB_ID=run1 bash example_scripts/nq/train.sh
# which runs `torchrun --nnodes=4 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=node001:29400 ...`.
# LAUNCHER=torchrun uses torchrun inside a SLURM allocation too. Relative paths are relative to the repository root.
cd "${ATLAS_ROOT:-$ROOT}"
# The run's name comes from JOB_ID: a rerun (or a requeued SLURM job) gets the same name and resumes from its
# checkpoint/latest; set JOB_ID to start another run.
JOB_ID=${SLURM_ARRAY_JOB_ID:-${SLURM_JOB_ID:-${JOB_ID:-local}}}
if [[ -n "${SLURM_JOB_ID:-}" && "${LAUNCHER:-srun}" == "srun" ]]; then
    LAUNCH=(srun python)
elif [[ "${NNODES:-1}" -gt 1 ]]; then
    LAUNCH=(torchrun --nnodes="$NNODES" --nproc_per_node="${NGPU:-8}" --rdzv_backend=c10d
        --rdzv_endpoint="${RDZV_ENDPOINT:?set RDZV_ENDPOINT=host:port of the first node}" --rdzv_id="$JOB_ID")
else
    LAUNCH=(torchrun --standalone --nproc_per_node="${NGPU:-8}")
fi
port=$(shuf -i 15000-16000 -n 1)  # --main_port: the rendezvous port under SLURM (torchrun brings its own)
