#!/usr/bin/env bash
# `make test-slurm`: a one-node SLURM cluster on this machine (munged, slurmctld and slurmd, with a generated
# config in a temporary folder), then through hydra/launcher=slurm a two-method sweep and a two-shard run on digits
# (CPU only), `snnbench report` of both and checks of what they wrote. Every daemon started here is stopped by its
# PID when the script ends, however it ends. Needs root; installs Debian's slurm-wlm and munge when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
started=$(date +%s)

if [ "$(id -u)" != 0 ]; then
    echo "error: the test starts munged, slurmctld and slurmd as root: run it as root (sudo make test-slurm)" >&2
    exit 2
fi
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
    echo "== installing slurm-wlm and munge"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
fi

WORK=$(mktemp -d /tmp/snnbench-slurm.XXXXXX)
export SLURM_CONF=$WORK/slurm.conf  # sbatch, squeue and scancel (which submitit calls) read this config
pids=()  # the daemons, in the order they started

stop_daemons() {
    local status=$?
    if [ -n "${slurmctld_pid:-}" ]; then
        scancel --quiet --user=root 2>/dev/null || true  # jobs left by a failure end while munge and slurmd run
        for _ in $(seq 30); do [ -z "$(squeue -h 2>/dev/null)" ] && break; sleep 1; done
    fi
    for (( i = ${#pids[@]} - 1; i >= 0; i-- )); do  # slurmd, slurmctld, then munged, which they talk to
        kill "${pids[i]}" 2>/dev/null || true
        wait "${pids[i]}" 2>/dev/null || true
    done
    if [ "$status" = 0 ]; then
        rm -rf "$WORK"
    else
        for log in "$WORK"/slurmctld.log "$WORK"/slurmd.log "$WORK"/munge/munged.log; do
            [ -f "$log" ] && { echo "== last lines of $log"; tail -n 15 "$log"; }
        done
        echo "test-slurm FAILED (status $status); its files are kept in $WORK" >&2
    fi
    exit "$status"
}
trap stop_daemons EXIT
trap 'exit 130' INT TERM

free_port() { "$BIN/python" -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])'; }

# each daemon in a session of its own (setsid, the same PID): Ctrl-C stops the test, which then stops the jobs and
# the daemons in order, instead of reaching the daemons first and orphaning the jobs' steps
echo "== starting munged, slurmctld and slurmd (config and logs in $WORK)"
mkdir -m 700 "$WORK/munge" "$WORK/state" "$WORK/spool"
dd if=/dev/urandom of="$WORK/munge/munge.key" bs=1024 count=1 status=none
chmod 400 "$WORK/munge/munge.key"
setsid munged --foreground --force --key-file="$WORK/munge/munge.key" --socket="$WORK/munge/munge.socket" \
    --pid-file="$WORK/munge/munged.pid" --log-file="$WORK/munge/munged.log" --seed-file="$WORK/munge/munged.seed" \
    > "$WORK/munged.out" 2>&1 &
pids+=($!)

host=$(hostname -s)
cat > "$SLURM_CONF" <<EOF
ClusterName=snnbench-test
SlurmctldHost=$host
SlurmUser=root
SlurmctldPort=$(free_port)
SlurmdPort=$(free_port)
AuthType=auth/munge
AuthInfo=socket=$WORK/munge/munge.socket
CredType=cred/munge
StateSaveLocation=$WORK/state
SlurmdSpoolDir=$WORK/spool
SlurmctldPidFile=$WORK/slurmctld.pid
SlurmdPidFile=$WORK/slurmd.pid
SlurmctldLogFile=$WORK/slurmctld.log
SlurmdLogFile=$WORK/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
ReturnToService=2
$(slurmd -C | head -n 1) State=UNKNOWN
PartitionName=test Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
for _ in $(seq 50); do [ -S "$WORK/munge/munge.socket" ] && break; sleep 0.2; done
setsid slurmctld -D -i -f "$SLURM_CONF" > "$WORK/slurmctld.out" 2>&1 &
slurmctld_pid=$!
pids+=("$slurmctld_pid")
setsid slurmd -D -f "$SLURM_CONF" > "$WORK/slurmd.out" 2>&1 &
pids+=($!)
for _ in $(seq 60); do
    [ "$(sinfo -h -o %T 2>/dev/null)" = idle ] && break
    sleep 1
done
sinfo

# every job a CPU-only SLURM job of one core; the jobs share trained ANNs through one cache_dir
launcher=(hydra/launcher=slurm hydra.launcher.partition=test hydra.launcher.gpus_per_node=0
          hydra.launcher.gpus_per_task=null hydra.launcher.cpus_per_task=1 hydra.launcher.mem_gb=1
          hydra.launcher.timeout_min=10 device=cpu sim.T=8 "cache_dir=$WORK/cache")
# without accounting storage (slurmdbd) sacct fails at every poll of submitit, which warns: expected here, so
# these lines are counted, not shown
quiet_submitit() {
    awk '/Bypassing sacct error|Slurm accounting storage is disabled/ { hidden++; next } { print }
         END { if (hidden) printf "(%d lines of sacct errors and submitit warnings hidden: no slurmdbd here)\n", hidden }'
}

echo "== a two-method sweep through hydra/launcher=slurm"
"$BIN/snnbench" run -m "${launcher[@]}" method=baseline,termapping "hydra.sweep.dir=$WORK/methods" 2>&1 | quiet_submitit
"$BIN/snnbench" report "$WORK/methods"

echo "== a two-shard run through hydra/launcher=slurm"
"$BIN/snnbench" run -m "${launcher[@]}" method=baseline sim.num_shards=2 "sim.shard=range(0,2)" \
    "hydra.sweep.dir=$WORK/shards" 2>&1 | quiet_submitit
"$BIN/snnbench" report "$WORK/shards"

echo "== checks"
"$BIN/python" - "$WORK" <<'EOF'
import json
import re
import sys
from pathlib import Path

import pandas as pd

work = Path(sys.argv[1])
methods = pd.read_csv(work / "methods" / "report.csv")
assert sorted(methods.method.unique()) == ["baseline", "termapping"] and len(methods) == 2 * 8, methods
assert pd.read_csv(work / "methods" / "failed.csv").empty
shards = [json.loads((work / "shards" / f"{shard}_baseline" / "summary.json").read_text()) for shard in (0, 1)]
assert [summary["shard"] for summary in shards] == [0, 1] and {s["num_shards"] for s in shards} == {2}
merged = json.loads((work / "shards" / "merged" / "0_baseline" / "summary.json").read_text())
assert merged["num_test_images"] == sum(summary["num_test_images"] for summary in shards)
jobs = set(re.findall(r"sched: Allocate JobId=(\S+)", (work / "slurmctld.log").read_text()))
assert len(jobs) == 4, f"slurmctld allocated {len(jobs)} jobs, not the 2 + 2 submitted"
print(f"4 SLURM jobs ran; report of the methods: {sorted(methods.method.unique())}, "
      f"{merged['num_test_images']} images in the 2 merged shards")
EOF
# the sweep's baseline job is the unsharded run with the same settings: the merged shards must equal it
"$BIN/python" scripts/compare_runs.py "$WORK/shards/merged/0_baseline" "$WORK/methods/0_baseline"

echo "test-slurm passed in $(( $(date +%s) - started )) s"
