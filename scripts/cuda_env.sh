# Finds the CUDA toolkit, the one place where convbn's scripts (and setup.py)
# look for it. Sourced:
#
#   source scripts/cuda_env.sh   # exports CUDA_HOME (and puts $CUDA_HOME/bin
#                                # first on PATH), or leaves it unset; says which
#                                # on stderr and in CONVBN_CUDA_FOUND_BY
#
# Run as a program (`bash scripts/cuda_env.sh`), it prints the directory and
# fails when there is none (setup.py calls it so).
#
# A toolkit is a directory with bin/nvcc, include/cuda_runtime.h and
# lib64/ (or lib/) holding libcudart.so. Where it looks, in order: CUDA_HOME,
# CUDA_PATH; the directory above the `nvcc` found on PATH (what torch guesses);
# that nvcc with its links resolved (readlink -f); the nvcc that a wrapper
# script on PATH execs (`exec /usr/local/cuda-13.0/bin/nvcc "$@"`);
# /usr/local/cuda; /usr/local/cuda-* (newest first). A wrapper outside the
# toolkit's bin/ misleads torch (it would take /usr/local for the toolkit and
# the link fails with `cannot find -lcudart`); this finds the real one.

convbn_is_cuda_home() {
  local dir=$1
  [ -n "$dir" ] && [ -x "$dir/bin/nvcc" ] && [ -f "$dir/include/cuda_runtime.h" ] &&
    { compgen -G "$dir/lib64/libcudart.so*" >/dev/null || compgen -G "$dir/lib/libcudart.so*" >/dev/null; }
}

# Prints "DIR<TAB>how it was found" for the first toolkit found; fails if none.
convbn_find_cuda_home() {
  local candidates=() nvcc real target dir i
  [ -n "${CUDA_HOME:-}" ] && candidates+=("$CUDA_HOME" "CUDA_HOME")
  [ -n "${CUDA_PATH:-}" ] && candidates+=("$CUDA_PATH" "CUDA_PATH")
  if nvcc=$(command -v nvcc 2>/dev/null); then
    candidates+=("$(dirname "$(dirname "$nvcc")")" "nvcc on PATH, $nvcc")
    real=$(readlink -f "$nvcc")
    [ "$real" != "$nvcc" ] && candidates+=("$(dirname "$(dirname "$real")")" "nvcc on PATH, $nvcc -> $real")
    # A shell wrapper: the nvcc it execs.
    if [ "$(head -c 2 "$real" 2>/dev/null)" = "#!" ]; then
      target=$(sed -n 's|^[[:space:]]*exec[[:space:]]\{1,\}["'\'']\{0,1\}\([^"'\''[:space:]]*/bin/nvcc\).*|\1|p' "$real" | head -1)
      [ -n "$target" ] && candidates+=("$(dirname "$(dirname "$(readlink -f "$target")")")" "the nvcc wrapper $nvcc, which execs $target")
    fi
  fi
  candidates+=(/usr/local/cuda "/usr/local/cuda")
  while read -r dir; do
    [ -n "$dir" ] && candidates+=("$dir" "$dir")
  done < <(ls -d /usr/local/cuda-* 2>/dev/null | sort -V -r)
  for ((i = 0; i < ${#candidates[@]}; i += 2)); do
    if convbn_is_cuda_home "${candidates[i]}"; then
      printf '%s\t%s\n' "$(readlink -f "${candidates[i]}")" "${candidates[i + 1]}"
      return 0
    fi
    if [ "${candidates[i + 1]}" = CUDA_HOME ] || [ "${candidates[i + 1]}" = CUDA_PATH ]; then
      echo "cuda_env: ${candidates[i + 1]}=${candidates[i]} is not a CUDA toolkit (no bin/nvcc, include/cuda_runtime.h or lib64/libcudart.so); looking elsewhere" >&2
    fi
  done
  return 1
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  # Run as a program: print the directory.
  found=$(convbn_find_cuda_home) || { echo "cuda_env: no CUDA toolkit found" >&2; exit 1; }
  echo "cuda_env: CUDA_HOME=${found%%$'\t'*} (found by: ${found#*$'\t'})" >&2
  echo "${found%%$'\t'*}"
else
  if convbn_cuda_found=$(convbn_find_cuda_home); then
    export CUDA_HOME=${convbn_cuda_found%%$'\t'*}
    [[ "$PATH" == "$CUDA_HOME/bin:"* ]] || export PATH="$CUDA_HOME/bin:$PATH"
    CONVBN_CUDA_FOUND_BY=${convbn_cuda_found#*$'\t'}
    echo "cuda_env: CUDA_HOME=$CUDA_HOME (found by: $CONVBN_CUDA_FOUND_BY)" >&2
  else
    unset CUDA_HOME
    CONVBN_CUDA_FOUND_BY="no CUDA toolkit found (no nvcc on PATH, none in /usr/local/cuda*)"
    echo "cuda_env: $CONVBN_CUDA_FOUND_BY" >&2
  fi
  unset convbn_cuda_found
fi
