#!/usr/bin/env bash
# N mscenario processes on this machine, joined into one JAX multi-controller run over
# loopback (127.0.0.1 only): what a pod slice does, on a laptop or in CI.
#
# Usage:
#   launch/local_multihost.sh N [--port P] [--devices-per-process K] [--timeout SECS]
#                               [--log-dir DIR] [--dry-run] -- <mscenario arguments>
# Example (2 processes x 2 CPU devices = one 4-device mesh):
#   launch/local_multihost.sh 2 --devices-per-process 2 -- \
#     train --config configs/synthetic.py --workdir /tmp/run --config.mesh.data=4
#
# Process i gets MSCENARIO_COORDINATOR=127.0.0.1:PORT, MSCENARIO_NUM_PROCESSES=N,
# MSCENARIO_PROCESS_ID=i, JAX_PLATFORMS=cpu and
# XLA_FLAGS=--xla_force_host_platform_device_count=K. Process 0 writes to this terminal; process
# i>0 to DIR/proc_i.log (DIR: --log-dir, else the --workdir among the arguments, else .).
# If any process fails, times out, or the script is interrupted, every process is stopped and
# the exit status is non-zero. $PYTHON picks the interpreter (default: python, else python3).
set -euo pipefail

usage() { sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "local_multihost: $*" >&2; exit 2; }

[[ $# -ge 1 ]] || { usage >&2; exit 2; }
case "$1" in -h|--help) usage; exit 0 ;; esac
N="$1"; shift
[[ "$N" =~ ^[1-9][0-9]*$ ]] || die "N must be a positive integer, got '$N'"
PORT="" DEVICES=1 TIMEOUT=0 LOG_DIR="" DRY_RUN=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --port) PORT="${2:?--port needs a value}"; shift 2 ;;
    --port=*) PORT="${1#*=}"; shift ;;
    --devices-per-process) DEVICES="${2:?--devices-per-process needs a value}"; shift 2 ;;
    --devices-per-process=*) DEVICES="${1#*=}"; shift ;;
    --timeout) TIMEOUT="${2:?--timeout needs a value}"; shift 2 ;;
    --timeout=*) TIMEOUT="${1#*=}"; shift ;;
    --log-dir) LOG_DIR="${2:?--log-dir needs a value}"; shift 2 ;;
    --log-dir=*) LOG_DIR="${1#*=}"; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) die "unknown option '$1' (mscenario arguments go after --)" ;;
  esac
done
[[ $# -gt 0 ]] || die "no mscenario arguments: put them after --, e.g. -- train --config ..."
[[ "$DEVICES" =~ ^[1-9][0-9]*$ ]] || die "--devices-per-process must be a positive integer"
[[ "$TIMEOUT" =~ ^[0-9]+$ ]] || die "--timeout must be a whole number of seconds (0 = none)"
ARGS=("$@")

if [[ -z "${PYTHON:-}" ]]; then
  if command -v python >/dev/null 2>&1; then PYTHON=python; else PYTHON=python3; fi
fi
if [[ -z "$PORT" ]]; then  # a free loopback port, chosen now (the OS picks it)
  for py in python3 python "$PYTHON"; do
    command -v "$py" >/dev/null 2>&1 || continue
    PORT="$(timeout 20 "$py" -c 'import socket
s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])' 2>/dev/null)" || PORT=""
    [[ -n "$PORT" ]] && break
  done
fi
[[ "$PORT" =~ ^[0-9]+$ ]] || die "--port must be a number, got '$PORT'"
if [[ -z "$LOG_DIR" ]]; then
  LOG_DIR=.
  for ((j = 0; j < ${#ARGS[@]}; j++)); do
    case "${ARGS[j]}" in
      --workdir) [[ $((j + 1)) -lt ${#ARGS[@]} ]] && LOG_DIR="${ARGS[j + 1]}" ;;
      --workdir=*) LOG_DIR="${ARGS[j]#*=}" ;;
    esac
  done
fi
# Any device-count flag already in XLA_FLAGS is replaced by ours.
OTHER_XLA_FLAGS="$(printf '%s' "${XLA_FLAGS:-}" | tr ' ' '\n' \
  | grep -v '^--xla_force_host_platform_device_count' | tr '\n' ' ' | sed 's/ *$//')" || true
PROC_XLA_FLAGS="${OTHER_XLA_FLAGS:+$OTHER_XLA_FLAGS }--xla_force_host_platform_device_count=$DEVICES"

proc_env() {  # the environment of process $1, as NAME=VALUE words
  printf '%s\n' "MSCENARIO_COORDINATOR=127.0.0.1:$PORT" "MSCENARIO_NUM_PROCESSES=$N" \
    "MSCENARIO_PROCESS_ID=$1" "JAX_PLATFORMS=cpu" "XLA_FLAGS=$PROC_XLA_FLAGS"
}

if [[ "$DRY_RUN" == 1 ]]; then
  for ((i = 0; i < N; i++)); do
    line=""
    while IFS= read -r kv; do line+="${kv%%=*}=$(printf '%q' "${kv#*=}") "; done < <(proc_env "$i")
    line+="$(printf '%q ' "$PYTHON" -m mscenario "${ARGS[@]}")"
    line="${line% }"
    if [[ $i -gt 0 ]]; then line+=" > $(printf '%q' "$LOG_DIR/proc_$i.log") 2>&1"; fi
    echo "$line"
  done
  exit 0
fi

PIDS=()
cleanup() {
  local pid alive=()
  for pid in "${PIDS[@]}"; do
    kill -0 "$pid" 2>/dev/null && alive+=("$pid")
  done
  [[ ${#alive[@]} -eq 0 ]] && return 0
  kill -TERM "${alive[@]}" 2>/dev/null || true
  for _ in $(seq 50); do  # up to 5 s to exit cleanly, then SIGKILL
    local left=0
    for pid in "${alive[@]}"; do kill -0 "$pid" 2>/dev/null && left=1; done
    [[ $left == 0 ]] && return 0
    sleep 0.1
  done
  kill -KILL "${alive[@]}" 2>/dev/null || true
}
trap cleanup EXIT
trap 'echo "local_multihost: interrupted, stopping all processes" >&2; exit 130' INT
trap 'echo "local_multihost: terminated, stopping all processes" >&2; exit 143' TERM HUP

if [[ $N -gt 1 ]]; then mkdir -p "$LOG_DIR"; fi
MSG="local_multihost: $N process(es) x $DEVICES CPU device(s), coordinator 127.0.0.1:$PORT"
if [[ $N -gt 1 ]]; then MSG+="; logs of processes 1..$((N - 1)): $LOG_DIR/proc_<i>.log"; fi
echo "$MSG" >&2
for ((i = 0; i < N; i++)); do
  mapfile -t envs < <(proc_env "$i")
  if [[ $i -eq 0 ]]; then
    env "${envs[@]}" "$PYTHON" -m mscenario "${ARGS[@]}" &
  else
    env "${envs[@]}" "$PYTHON" -m mscenario "${ARGS[@]}" > "$LOG_DIR/proc_$i.log" 2>&1 &
  fi
  PIDS+=("$!")
done

# Wait for all; the first failure (or the timeout) stops the rest, which would otherwise block
# in a collective waiting for the dead process.
START=$SECONDS
declare -A DONE=()
while [[ ${#DONE[@]} -lt $N ]]; do
  for ((i = 0; i < N; i++)); do
    [[ -n "${DONE[$i]:-}" ]] && continue
    pid="${PIDS[i]}"
    kill -0 "$pid" 2>/dev/null && continue
    rc=0; wait "$pid" || rc=$?
    DONE[$i]=$rc
    if [[ $rc -ne 0 ]]; then
      echo "local_multihost: process $i exited with status $rc; stopping the others" >&2
      if [[ $i -gt 0 ]]; then
        echo "---- last lines of $LOG_DIR/proc_$i.log ----" >&2
        tail -n 30 "$LOG_DIR/proc_$i.log" >&2 || true
      fi
      exit "$rc"
    fi
  done
  if [[ $TIMEOUT -gt 0 && $((SECONDS - START)) -gt $TIMEOUT ]]; then
    echo "local_multihost: timed out after ${TIMEOUT}s; stopping all processes" >&2
    exit 124
  fi
  sleep 0.2
done
echo "local_multihost: all $N process(es) finished" >&2
