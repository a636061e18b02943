#!/usr/bin/env bash
# Train on every worker (host) of a Cloud TPU VM slice: optionally create the slice, copy this
# repository to all workers, install it, and run `python -m mscenario <arguments>` on all of
# them at once. JAX finds the coordinator and the other workers from the TPU metadata
# (MSCENARIO_DISTRIBUTED=auto makes mscenario call jax.distributed.initialize()).
#
# Usage:
#   launch/tpu_vm.sh --name NAME --zone ZONE [--project P]
#       [--create --accelerator v5litepod-16 --version tpu-ubuntu2204-base]
#       [--no-copy] [--no-install] [--remote-dir mscenario] [--env KEY=VALUE ...]
#       [--dry-run] -- <mscenario arguments>
# Example (4 hosts x 4 chips = 16 devices, tables sharded 4 ways):
#   launch/tpu_vm.sh --name ms-pod --zone us-west4-a --create -- \
#     train --config configs/ml1m_star.py --workdir /mnt/shared/runs/star \
#     --config.mesh.data=4 --config.mesh.model=4
#
# Every worker must see the same --workdir (checkpoints are written by all hosts, metadata by
# host 0) and the data: mount a shared file system (Filestore/NFS, or a bucket with gcsfuse)
# and run `mscenario data get …` there once. --dry-run prints every command and runs none.
set -euo pipefail

usage() { sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "tpu_vm: $*" >&2; exit 2; }

NAME="" ZONE="" PROJECT="" CREATE=0 ACCEL="v5litepod-16" VERSION="tpu-ubuntu2204-base"
COPY=1 INSTALL=1 REMOTE_DIR="mscenario" DRY_RUN=0 ENVS=()
JAX_SPEC="${JAX_SPEC:-jax[tpu]}" REMOTE_PYTHON_VERSION="${REMOTE_PYTHON_VERSION:-3.12}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) NAME="${2:?}"; shift 2 ;;
    --zone) ZONE="${2:?}"; shift 2 ;;
    --project) PROJECT="${2:?}"; shift 2 ;;
    --create) CREATE=1; shift ;;
    --accelerator) ACCEL="${2:?}"; shift 2 ;;
    --version) VERSION="${2:?}"; shift 2 ;;
    --no-copy) COPY=0; shift ;;
    --no-install) INSTALL=0; shift ;;
    --remote-dir) REMOTE_DIR="${2:?}"; shift 2 ;;
    --env) [[ "${2:?}" == *=* ]] || die "--env takes KEY=VALUE"; ENVS+=("$2"); shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) die "unknown option '$1' (mscenario arguments go after --)" ;;
  esac
done
[[ -n "$NAME" && -n "$ZONE" ]] || die "--name and --zone are required (see --help)"
[[ $# -gt 0 ]] || die "no mscenario arguments: put them after --, e.g. -- train --config ..."
[[ "$REMOTE_DIR" =~ ^[A-Za-z0-9._-]+$ ]] || die "--remote-dir: a directory name in the home directory (letters, digits, . _ -)"
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
#    then jax[tpu] and mscenario (editable).
VENV="\$HOME/$REMOTE_DIR/.venv"
if [[ "$INSTALL" == 1 ]]; then
  INSTALL_CMD="set -e; python3 -m pip install --user -q -U uv; export PATH=\$HOME/.local/bin:\$PATH"
  INSTALL_CMD+="; uv venv -q --allow-existing --python $REMOTE_PYTHON_VERSION $VENV"
  INSTALL_CMD+="; uv pip install -q --python $VENV/bin/python -U $(q "$JAX_SPEC")"
  INSTALL_CMD+="; uv pip install -q --python $VENV/bin/python -e \$HOME/$REMOTE_DIR"
  run gcloud compute tpus tpu-vm ssh "$NAME" "${WHERE[@]}" --worker=all --command="$INSTALL_CMD"
fi

# 4. Run on all workers at once.
RUN_CMD="cd \$HOME/$REMOTE_DIR && env MSCENARIO_DISTRIBUTED=auto"
for kv in "${ENVS[@]+"${ENVS[@]}"}"; do RUN_CMD+=" $(q "$kv")"; done
RUN_CMD+=" $VENV/bin/python -m mscenario"
for a in "$@"; do RUN_CMD+=" $(q "$a")"; done
run gcloud compute tpus tpu-vm ssh "$NAME" "${WHERE[@]}" --worker=all --command="$RUN_CMD"
