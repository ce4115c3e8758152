# shellcheck shell=bash
# Helpers shared by the tpu/*.sh scripts; sourced, never run on its own.
#
# Each script declares the flags it accepts, calls parse_args and require,
# then issues gcloud commands through `run`, which prints instead of running
# them under --dry-run (so dry runs need no gcloud install and no credentials).

PROG=${0##*/}
DRY_RUN=0
declare -A OPT=()  # flag name without "--" -> value ("1" for switches)
EXTRA_ARGS=()      # everything after "--", for scripts that pass it through

# Usage mistakes exit 2 (like getopt/argparse) so they can be told apart from
# gcloud failures.
usage_error() {
  echo "$PROG: $*" >&2
  exit 2
}

# parse_args SPEC "$@"
# SPEC lists the accepted flags without dashes: "name=" takes a value,
# "spot" is a switch, and "--" allows pass-through arguments. --dry-run and
# --help are always accepted; --help prints the script's leading comment.
parse_args() {
  local spec=" $1 " flag
  shift
  while (($#)); do
    case $1 in
      --dry-run) DRY_RUN=1 ;;
      -h | --help)
        awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"
        exit 0
        ;;
      --)
        [[ $spec == *" -- "* ]] || usage_error "unexpected '--'"
        shift
        # shellcheck disable=SC2034  # read by the scripts that source this file
        EXTRA_ARGS=("$@")
        break
        ;;
      --?*=*)
        flag=${1%%=*}
        flag=${flag#--}
        if [[ $spec == *" $flag "* ]]; then
          usage_error "flag --$flag takes no value"
        fi
        [[ $spec == *" $flag= "* ]] || usage_error "unknown flag: --$flag"
        OPT[$flag]=${1#*=}
        ;;
      --?*)
        flag=${1#--}
        if [[ $spec == *" $flag= "* ]]; then
          # A following flag is never a sensible value; it means one was left out.
          [[ $# -ge 2 && $2 != --* ]] || usage_error "flag --$flag needs a value"
          OPT[$flag]=$2
          shift
        elif [[ $spec == *" $flag "* ]]; then
          OPT[$flag]=1
        else
          usage_error "unknown flag: $1"
        fi
        ;;
      *) usage_error "unexpected argument: $1" ;;
    esac
    shift
  done
}

# require FLAG...: fail unless each flag was given a non-empty value.
require() {
  local flag
  for flag; do
    [[ -n ${OPT[$flag]:-} ]] || usage_error "missing required flag --$flag"
  done
}

# shell_quote ARG...: prints the args as one line a POSIX shell reads back
# as the same words; quotes exactly like Python's shlex.join, which the tests
# rely on.
shell_quote() {
  local arg words=() sq="'" escaped_sq="'\"'\"'"
  for arg; do
    if [[ -n $arg && $arg != *[!A-Za-z0-9_@%+=:,./-]* ]]; then
      words+=("$arg")
    else
      words+=("'${arg//$sq/$escaped_sq}'")
    fi
  done
  echo "${words[*]}"
}

# double_quote STRING: prints STRING double-quoted for a POSIX shell. Used to
# nest a command inside another one, where single quotes would need the
# unreadable '"'"' dance.
double_quote() {
  local s=$1
  s=${s//\\/\\\\}
  s=${s//\$/\\\$}
  s=${s//\"/\\\"}
  s=${s//\`/\\\`}
  echo "\"$s\""
}

# tpu_slice NAME: prints "ACCELERATOR_TYPE RUNTIME_VERSION" for a slice in either spelling (v5e-16 or
# v5litepod-16, or the shape v5e:4x4), from the one table of slices, TPU_GENERATIONS in
# jaxlm/training/chips.py (run as a plain script: standard library only, no JAX or venv needed).
# Exit 2 with one line on stderr for a size Cloud does not build, 3 for a generation the table lacks.
tpu_slice() {
  python3 "$(dirname "${BASH_SOURCE[0]}")/../jaxlm/training/chips.py" "$1"
}

# run CMD...: runs CMD, or under --dry-run prints it as one copy-pasteable line.
run() {
  if ((DRY_RUN)); then
    shell_quote "$@"
  else
    "$@"
  fi
}

# tpu_ssh WORKER COMMAND: runs the shell COMMAND on one worker ("0", "1", ...)
# or on all of them at once ("all") of the TPU VM named by --name.
tpu_ssh() {
  run gcloud compute tpus tpu-vm ssh "${OPT[name]}" \
    --zone "${OPT[zone]}" --project "${OPT[project]}" \
    --worker="$1" --command "$2"
}

# queued_resource VERB [ARG...]: gcloud's queued-resources VERB for --name.
queued_resource() {
  run gcloud compute tpus queued-resources "$1" "${OPT[name]}" "${@:2}" \
    --zone "${OPT[zone]}" --project "${OPT[project]}"
}
