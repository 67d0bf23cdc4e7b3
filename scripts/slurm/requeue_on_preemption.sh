# Sourced by the batch scripts after they start the job step in the background ($! is its srun).
# --signal=B:USR1@180 signals this batch shell only: forward it to the job step, whose tasks then stop together at
# one optimizer step with a checkpoint there and exit 75 (bmc_fast/trainer/preemption.py); requeue the job on 75.
# (#SBATCH --signal=USR1@180, without B:, would signal every task directly; the forwarding is then a no-op.)
step=$!
trap 'echo "$(date) preemption notice: SIGUSR1 to job step $step"; kill -USR1 "$step"' USR1
while true; do
    wait "$step"
    status=$?
    kill -0 "$step" 2>/dev/null || break  # wait returns early when the trap runs; the step may still be going
done
if [ "$status" -eq 75 ]; then
    echo "$(date) the run stopped at a checkpoint (exit 75): requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
fi
exit "$status"
