#!/usr/bin/env bash
# Train on every worker (host) of a Cloud TPU VM slice: optionally create the slice, copy this
# repository to all workers, install it, and start `python -m mscenario <arguments>` on all of
# them at once, detached from ssh: a dropped connection does not stop the run. JAX finds the
# coordinator and the other workers from the TPU metadata (MSCENARIO_DISTRIBUTED=auto makes
# mscenario call jax.distributed.initialize()).
#
# Usage:
#   launch/tpu_vm.sh --name NAME --zone ZONE [--project P]                          (start)
#       [--create --accelerator v5litepod-16 --version tpu-ubuntu2204-base]
#       [--no-copy] [--no-install] [--remote-dir mscenario] [--env KEY=VALUE ...]
#       [--dry-run] -- <mscenario arguments>
#   launch/tpu_vm.sh --name NAME --zone ZONE [--project P] [--remote-dir D] [--worker W]
#       [--dry-run] --status | --logs [--lines 50] | --stop [--wait 300] [--force]
# Example (4 hosts x 4 chips = 16 devices, tables sharded 4 ways):
#   launch/tpu_vm.sh --name ms-pod --zone us-west4-a --create -- \
#     train --config configs/ml1m_star.py --workdir /mnt/shared/runs/star \
#     --config.mesh.data=4 --config.mesh.model=4
#   launch/tpu_vm.sh --name ms-pod --zone us-west4-a --status   # running? last log line
#   launch/tpu_vm.sh --name ms-pod --zone us-west4-a --logs     # last 50 lines, every worker
#   launch/tpu_vm.sh --name ms-pod --zone us-west4-a --stop     # SIGTERM: checkpoint, exit 75
#
# On each worker the run is started with `nohup setsid` (its own session: no SIGHUP when ssh
# goes away) and writes ~/mscenario-logs/worker-$(hostname).log; its process group id goes
# to worker-$(hostname).pid and, when it ends, its exit status to worker-$(hostname).exit
# (the folder is ~/<remote-dir>-logs). A start is refused on a worker where a run is alive.
# --stop sends SIGTERM to that process group on the workers (mscenario saves a checkpoint at
# the next step boundary and exits with 75; the same start command resumes), waits up to
# --wait seconds and reports; --force then sends SIGKILL to what is left. --worker (default
# all) limits --status/--logs/--stop to some workers (gcloud's syntax: 0, 1,3 or 0-2).
#
# Every worker must see the same --workdir (checkpoints are written by all hosts, metadata by
# host 0) and the data: mount a shared file system (Filestore/NFS, or a bucket with gcsfuse)
# and run `mscenario data get …` there once. --dry-run prints every command and runs none.
# shellcheck disable=SC2016  # '$HOME', '$f', '$(hostname)': shell code expanded on the workers
set -euo pipefail

usage() { awk 'NR > 1 && /^# shellcheck/ { next } NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
die() { echo "tpu_vm: $*" >&2; echo "tpu_vm: see launch/tpu_vm.sh --help" >&2; exit 2; }
value() { [[ $# -ge 2 ]] || die "$1 needs a value"; }  # value OPTION "$@": OPTION has one

NAME="" ZONE="" PROJECT="" CREATE=0 ACCEL="v5litepod-16" VERSION="tpu-ubuntu2204-base"
COPY=1 INSTALL=1 REMOTE_DIR="mscenario" DRY_RUN=0 ENVS=()
ACTION="start" WORKER="" WAIT=300 FORCE=0 LINES=50 START_ONLY=() STOP_ONLY=()
JAX_SPEC="${JAX_SPEC:-jax[tpu]}" REMOTE_PYTHON_VERSION="${REMOTE_PYTHON_VERSION:-3.12}"
action() { [[ "$ACTION" == start || "$ACTION" == "$1" ]] || die "--$ACTION and --$1: one action at a time"; ACTION="$1"; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) value "$@"; NAME="$2"; shift 2 ;;
    --zone) value "$@"; ZONE="$2"; shift 2 ;;
    --project) value "$@"; PROJECT="$2"; shift 2 ;;
    --create) CREATE=1; START_ONLY+=("$1"); shift ;;
    --accelerator) value "$@"; ACCEL="$2"; START_ONLY+=("$1"); shift 2 ;;
    --version) value "$@"; VERSION="$2"; START_ONLY+=("$1"); shift 2 ;;
    --no-copy) COPY=0; START_ONLY+=("$1"); shift ;;
    --no-install) INSTALL=0; START_ONLY+=("$1"); shift ;;
    --remote-dir) value "$@"; REMOTE_DIR="$2"; shift 2 ;;
    --env) value "$@"; [[ "$2" == *=* ]] || die "--env takes KEY=VALUE"; ENVS+=("$2")
      START_ONLY+=("$1"); shift 2 ;;
    --status) action status; shift ;;
    --logs) action logs; shift ;;
    --stop) action stop; shift ;;
    --worker) value "$@"; WORKER="$2"; shift 2 ;;
    --lines) value "$@"; LINES="$2"; shift 2 ;;
    --wait) value "$@"; WAIT="$2"; STOP_ONLY+=("$1"); shift 2 ;;
    --force) FORCE=1; STOP_ONLY+=("$1"); shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) die "unknown option '$1' (mscenario arguments go after --)" ;;
  esac
done
[[ -n "$NAME" && -n "$ZONE" ]] || die "--name and --zone are required"
[[ "$REMOTE_DIR" =~ ^[A-Za-z0-9._-]+$ ]] || die "--remote-dir: a directory name in the home directory (letters, digits, . _ -)"
if [[ "$ACTION" == start ]]; then
  [[ $# -gt 0 ]] || die "no mscenario arguments: put them after --, e.g. -- train --config ... (or --status, --logs, --stop)"
  [[ -z "$WORKER" ]] || die "--worker is for --status, --logs and --stop: a run starts on all workers"
else
  [[ $# -eq 0 ]] || die "--$ACTION takes no mscenario arguments (got '$*')"
  [[ ${#START_ONLY[@]} -eq 0 ]] || die "${START_ONLY[0]} is for starting a run, not --$ACTION"
fi
[[ "$ACTION" == stop || ${#STOP_ONLY[@]} -eq 0 ]] || die "${STOP_ONLY[0]} goes with --stop"
[[ "$LINES" =~ ^[1-9][0-9]*$ ]] || die "--lines must be a positive integer, got '$LINES'"
[[ "$WAIT" =~ ^[0-9]+$ ]] || die "--wait must be a whole number of seconds, got '$WAIT'"
WORKER="${WORKER:-all}"
[[ "$WORKER" == all || "$WORKER" =~ ^[0-9]+(-[0-9]+)?(,[0-9]+(-[0-9]+)?)*$ ]] \
  || die "--worker: all, an index (0), a list (1,3) or a range (0-2), got '$WORKER'"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

WHERE=(--zone="$ZONE")
[[ -n "$PROJECT" ]] && WHERE+=(--project="$PROJECT")

q() {  # one word, single-quoted for a POSIX shell where needed
  local s="$1" sq="'"
  if [[ "$s" =~ ^[A-Za-z0-9_./:=@%+,~-]+$ && "$s" != *"~"* ]]; then printf '%s' "$s"
  else printf "'%s'" "${s//$sq/$sq\\$sq$sq}"; fi
}
run() {  # print the command (shell-quoted); run it unless --dry-run
  local out="" w
  for w in "$@"; do out+="$(q "$w") "; done
  echo "${out% }"
  [[ "$DRY_RUN" == 1 ]] || "$@"
}
on_workers() {  # on_workers WORKER REMOTE_COMMAND: run a shell command on the workers over ssh
  run gcloud compute tpus tpu-vm ssh "$NAME" "${WHERE[@]}" --worker="$1" --command="$2"
}

# Files of the detached run on each worker, named in each remote command by `f` (expanded
# there: $HOME and the host name are the worker's). The strings below are shell code for the
# worker's login shell; \$ is expanded over there.
F='h=$(hostname); f=$HOME/'"$REMOTE_DIR"'-logs/worker-$h; '
LOG='$f.log' PIDF='$f.pid' EXITF='$f.exit'
# True while the run lives: its session (= process group, the pid file) still has a mscenario
# process; a stale pid file (the VM restarted and the id was reused) does not count.
ALIVE="[ -s $PIDF ] && ps -ww -o args= -s \"\$(cat $PIDF)\" 2>/dev/null | grep -q 'python -m mscenario'"
EXPLAIN="x=\$(cat $EXITF 2>/dev/null); case \"\$x\" in 0) x='0 (finished)' ;;"
EXPLAIN+=" 75) x='75 (stopped by SIGTERM, checkpoint saved: the same start command resumes)' ;;"
EXPLAIN+=" 137) x='137 (SIGKILL)' ;; 143) x='143 (SIGTERM outside the training loop: no checkpoint)' ;;"
EXPLAIN+=" '') x='unknown (no exit file: killed with its wrapper, or the VM restarted)' ;; esac;"
LAST_LINE="tail -c 65536 $LOG | tr '\\r' '\\n' | grep -v '^[[:space:]]*\$' | tail -n 1"

case "$ACTION" in
  status)
    S="$F""if [ ! -s $PIDF ]; then echo \"\$h: no run started (no $PIDF)\";"
    S+=" elif $ALIVE; then echo \"\$h: running, process group \$(cat $PIDF), log $LOG\";"
    S+=" else $EXPLAIN echo \"\$h: not running, exit status \$x\"; fi;"
    S+=" if [ -s $LOG ]; then echo \"\$h: last log line: \$($LAST_LINE)\"; fi"
    on_workers "$WORKER" "$S"
    exit 0 ;;
  logs)
    S="$F""if [ -f $LOG ]; then echo \"==> \$h: $LOG <==\"; tail -c 4000000 $LOG | tr '\\r' '\\n'"
    S+=" | tail -n $LINES | awk 1; else echo \"\$h: no log ($LOG)\"; fi"
    on_workers "$WORKER" "$S"
    exit 0 ;;
  stop)
    # 1. SIGTERM on every worker first (a fast command), so that all of them get it at once...
    S="$F""if $ALIVE; then kill -TERM -- -\"\$(cat $PIDF)\" && echo \"\$h: sent SIGTERM to process group \$(cat $PIDF)\";"
    S+=" else echo \"\$h: not running\"; fi"
    on_workers "$WORKER" "$S"
    # 2. ...then wait up to --wait seconds on each for the checkpoint and the exit, and report.
    S="$F""i=0; while $ALIVE && [ \$i -lt $WAIT ]; do sleep 1; i=\$((i + 1)); done;"
    S+=" if $ALIVE; then"
    if [[ "$FORCE" == 1 ]]; then
      S+=" kill -KILL -- -\"\$(cat $PIDF)\"; sleep 1; [ -s $EXITF ] || echo 137 > $EXITF;"
      S+=" echo \"\$h: still running after ${WAIT}s: sent SIGKILL to process group \$(cat $PIDF)\";"
    else
      S+=" echo \"\$h: still running after ${WAIT}s (saving a checkpoint?): see --status, or --stop --force\"; exit 1;"
    fi
    S+=" elif [ -s $PIDF ]; then $EXPLAIN echo \"\$h: stopped, exit status \$x\";"
    S+=" else echo \"\$h: no run started (no $PIDF)\"; fi"
    on_workers "$WORKER" "$S"
    exit 0 ;;
esac

# 1. Create the slice.
if [[ "$CREATE" == 1 ]]; then
  run gcloud compute tpus tpu-vm create "$NAME" "${WHERE[@]}" \
    --accelerator-type="$ACCEL" --version="$VERSION"
fi

# 2. Copy the source tree (no .git, caches, virtual environments or run outputs) into the home
#    directory of every worker (files already there are overwritten).
if [[ "$COPY" == 1 ]]; then
  STAGE="${TMPDIR:-/tmp}/mscenario-tpu-stage"
  run rm -rf "$STAGE"
  run mkdir -p "$STAGE/$REMOTE_DIR"
  run tar -C "$REPO" --exclude=.git --exclude=__pycache__ --exclude='*.egg-info' \
    --exclude=.venv --exclude=venv --exclude=.pytest_cache --exclude=runs -cf "$STAGE/src.tar" .
  run tar -C "$STAGE/$REMOTE_DIR" -xf "$STAGE/src.tar"
  run gcloud compute tpus tpu-vm scp --recurse "$STAGE/$REMOTE_DIR" "$NAME:" "${WHERE[@]}" \
    --worker=all
fi

# 3. Install: a Python >= 3.11 virtual environment (the base image has 3.10) made by uv,
#    then jax[tpu] and mscenario (editable), held to the tested versions in constraints.txt
#    where the copied tree has one.
VENV="\$HOME/$REMOTE_DIR/.venv"
if [[ "$INSTALL" == 1 ]]; then
  INSTALL_CMD="set -e; python3 -m pip install --user -q -U uv; export PATH=\$HOME/.local/bin:\$PATH"
  INSTALL_CMD+="; C=; if [ -f \$HOME/$REMOTE_DIR/constraints.txt ]; then C=\"-c \$HOME/$REMOTE_DIR/constraints.txt\"; fi"
  INSTALL_CMD+="; uv venv -q --allow-existing --python $REMOTE_PYTHON_VERSION $VENV"
  INSTALL_CMD+="; uv pip install -q --python $VENV/bin/python \$C -U $(q "$JAX_SPEC")"
  INSTALL_CMD+="; uv pip install -q --python $VENV/bin/python \$C -e \$HOME/$REMOTE_DIR"
  on_workers all "$INSTALL_CMD"
fi

# 4. Start on all workers at once, detached: `setsid` gives the run its own session (no SIGHUP
#    when ssh goes away), `nohup` and the redirections detach it from the ssh channel. The
#    wrapper shell writes its pid (= the process group id) first and the exit status last; it
#    traps TERM/INT so that a --stop reaches mscenario and the wrapper still records the status.
RUN_CMD="cd \$HOME/$REMOTE_DIR && env MSCENARIO_DISTRIBUTED=auto"
for kv in "${ENVS[@]+"${ENVS[@]}"}"; do RUN_CMD+=" $(q "$kv")"; done
RUN_CMD+=" $VENV/bin/python -m mscenario"
for a in "$@"; do RUN_CMD+=" $(q "$a")"; done
STAMP='$(date -u +%Y-%m-%dT%H:%M:%SZ)'
WRAPPER="$F""echo \$\$ > $PIDF; trap : TERM INT;"
WRAPPER+=" echo \"tpu_vm: started $STAMP on \$h, process group \$\$\"; $RUN_CMD;"
WRAPPER+=" rc=\$?; echo \"tpu_vm: exited with status \$rc at $STAMP\"; echo \$rc > $EXITF.tmp && mv -f $EXITF.tmp $EXITF"
S="$F""mkdir -p \$HOME/$REMOTE_DIR-logs || exit 1;"
S+=" if $ALIVE; then echo \"\$h: a run is alive here (process group \$(cat $PIDF)): --stop it first\" >&2; exit 1; fi;"
S+=" rm -f $PIDF $EXITF; if [ -f $LOG ]; then mv -f $LOG $LOG.prev; fi;"
S+=" nohup setsid bash -c $(q "$WRAPPER") > $LOG 2>&1 < /dev/null &"
S+=" i=0; while [ ! -s $PIDF ] && [ \$i -lt 50 ]; do sleep 0.2; i=\$((i + 1)); done;"
S+=" if [ -s $PIDF ]; then echo \"\$h: started, process group \$(cat $PIDF), log $LOG\";"
S+=" else echo \"\$h: did not start, see $LOG\" >&2; exit 1; fi"
on_workers all "$S"
HOW="launch/tpu_vm.sh --name $(q "$NAME") ${WHERE[*]}"
[[ "$REMOTE_DIR" == mscenario ]] || HOW+=" --remote-dir $REMOTE_DIR"
echo "tpu_vm: started detached on every worker; follow with: $HOW --status | --logs | --stop" >&2
