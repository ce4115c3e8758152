#!/usr/bin/env bash
# Usage: tpu/supervise.sh --name NAME --zone ZONE --project PROJECT
#            --accelerator-type TYPE --config CONFIG --workdir gs://BUCKET/RUN
#            [--runtime-version V] [--repo URL_OR_DIR] [--ref REF] [--eval]
#            [--max-attempts N] [--poll-seconds S] [--max-errors N] [--delete-when-done]
#            [--dry-run] [-- JAXLM_TRAIN_ARGS...]
#
# Carries a training run on a Spot TPU VM to its end, through preemptions.
# Every --poll-seconds (default 60) it looks at the queued resource NAME:
#   missing, PREEMPTED, SUSPENDING, SUSPENDED or FAILED: deletes it (if it
#     exists), creates it again (create.sh --spot) and reinstalls jaxlm
#     (install.sh);
#   ACTIVE, no `jaxlm train` running on worker 0: launches the job
#     (launch.sh), which resumes from the last checkpoint in WORKDIR;
#   anything else (waiting for capacity, provisioning, a job running): waits.
# It stops with status 0 once WORKDIR/train_summary.json says
# "stop_reason": "finished" and no job is running (then deletes the VM with
# --delete-when-done), and with status 1 rather than launch the job more
# than --max-attempts times (default 5). A question gcloud fails to answer
# (an error other than "not found", or an unexpected reply) is asked again
# after 5 s, 10 s, 20 s ... (at most 5 min), and never taken for "missing"
# or "not running": after --max-errors (default 10) failures in a row it
# stops with status 1, having created and launched nothing on their account.
# With --dry-run it still looks
# (queued-resource describe, ssh pgrep, storage cat) but prints the commands
# that would change anything instead of running them.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR disable=SC1091
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
HERE=$(dirname "${BASH_SOURCE[0]}")

OPT[max-attempts]=5
OPT[poll-seconds]=60
OPT[max-errors]=10
parse_args "name= zone= project= accelerator-type= config= workdir= runtime-version= repo= ref= eval max-attempts= poll-seconds= max-errors= delete-when-done --" "$@"
require name zone project accelerator-type config workdir max-attempts poll-seconds max-errors
# A bucket name (3-222 of a-z 0-9 . _ -, starting and ending with a letter or digit), then an optional path
# with no empty, "." or ".." part.
bucket_url='^gs://[a-z0-9][a-z0-9._-]{1,220}[a-z0-9](/([^/]+(/[^/]+)*/?)?)?$'
[[ ${OPT[workdir]} =~ $bucket_url && ! ${OPT[workdir]} =~ /\.\.?(/|$) ]] ||
  usage_error "--workdir must be a gs://BUCKET/PATH URL (got '${OPT[workdir]}'): a re-created VM finds the checkpoints only there"
[[ ${OPT[max-attempts]} =~ ^[1-9][0-9]*$ ]] || usage_error "--max-attempts must be a positive integer"
[[ ${OPT[poll-seconds]} =~ ^[0-9]+$ ]] || usage_error "--poll-seconds must be a whole number of seconds"
[[ ${OPT[max-errors]} =~ ^[1-9][0-9]*$ ]] || usage_error "--max-errors must be a positive integer"

location=(--name "${OPT[name]}" --zone "${OPT[zone]}" --project "${OPT[project]}")
dry=()
if ((DRY_RUN)); then
  dry=(--dry-run)
fi
create=("${location[@]}" --accelerator-type "${OPT[accelerator-type]}" --spot)
if [[ -n ${OPT[runtime-version]:-} ]]; then
  create+=(--runtime-version "${OPT[runtime-version]}")
fi
install=("${location[@]}")
for flag in repo ref; do
  if [[ -n ${OPT[$flag]:-} ]]; then
    install+=("--$flag" "${OPT[$flag]}")
  fi
done
launch=("${location[@]}" --config "${OPT[config]}" --workdir "${OPT[workdir]}")
if [[ -n ${OPT[eval]:-} ]]; then
  launch+=(--eval)
fi
launch+=(-- "${EXTRA_ARGS[@]}")

say() {
  echo "$PROG: $*" >&2
}

# gcloud's questions: each sets $answer and returns 0, or returns 1 when gcloud gave no readable answer (an
# error that is not "not found": no network, expired credentials, a quota, an unexpected reply), with
# gcloud's first error line in $error. An unreadable answer is asked again later; it never counts as
# "missing" or "stopped", which would create a VM or launch a job on top of a running one.
errors=$(mktemp)
trap 'rm -f "$errors"' EXIT
answer=""
error=""

# gcloud CMD...: runs gcloud, its stderr saved in $errors; sets $answer to its stdout; returns its status.
ask_gcloud() {
  local status=0
  answer=$(gcloud "$@" 2>"$errors") || status=$?
  error=$(grep -m 1 -v '^[[:space:]]*$' "$errors" || true)
  error=${error:-"gcloud exited with status $status and said nothing"}
  return "$status"
}

# The queued resource's state; "" when gcloud says it does not exist.
resource_state() {
  if ask_gcloud compute tpus queued-resources describe "${OPT[name]}" --format='value(state.state)' \
    --zone "${OPT[zone]}" --project "${OPT[project]}"; then
    [[ $answer =~ ^[A-Z_]+$ ]] || { error="unexpected state '$answer'" && return 1; }
  else
    grep -Eqi 'NOT_FOUND|was not found|does not exist' "$errors" || return 1
    answer=""
  fi
}

# Whether `jaxlm train` runs on worker 0: "running" or "stopped". "[j]axlm" keeps pgrep from matching the
# shell running it.
job_state() {
  ask_gcloud compute tpus tpu-vm ssh "${OPT[name]}" --zone "${OPT[zone]}" --project "${OPT[project]}" \
    --worker=0 --command 'pgrep -f "[j]axlm train" > /dev/null && echo running || echo stopped' || return 1
  answer=$(tail -n 1 <<<"$answer")
  [[ $answer == running || $answer == stopped ]] || { error="unexpected answer '$answer' from pgrep" && return 1; }
}

# Whether the run wrote a train_summary.json that says it reached train.num_steps: "yes" or "no" (no summary yet).
finished_state() {
  local pattern='"stop_reason"[[:space:]]*:[[:space:]]*"finished"'
  if ask_gcloud storage cat "${OPT[workdir]%/}/train_summary.json"; then
    if [[ $answer =~ $pattern ]]; then answer=yes; else answer=no; fi
  else
    grep -Eqi 'matched no objects|No URLs matched' "$errors" || return 1
    answer=no
  fi
}

# ask QUESTION WHAT: calls the function QUESTION until it gives a readable answer (then in $answer), waiting
# 5 s, 10 s, 20 s ... (at most 5 min) after each unreadable one; stops the supervisor with status 1 after
# --max-errors unreadable answers in a row, having changed nothing on their account.
ask() {
  local tries=0 delay=5
  until "$1"; do
    tries=$((tries + 1))
    if ((tries >= ${OPT[max-errors]})); then
      say "giving up: gcloud failed $tries time(s) in a row to tell $2 (last: $error);" \
        "nothing was created, deleted or launched on account of it"
      exit 1
    fi
    say "could not tell $2 (gcloud: $error); asking again in $delay s"
    sleep "$delay"
    delay=$((delay * 2 > 300 ? 300 : delay * 2))
  done
}

finished() {
  ask finished_state "whether the run in ${OPT[workdir]} finished"
  [[ $answer == yes ]]
}

max_attempts=${OPT[max-attempts]}
attempts=0
installed=0 # whether this VM has had jaxlm installed by this supervisor
while true; do
  ask resource_state "the state of ${OPT[name]}"
  state=$answer
  case $state in
    ACTIVE)
      ask job_state "whether the job runs on ${OPT[name]}"
      if [[ $answer == running ]]; then
        sleep "${OPT[poll-seconds]}"
        continue
      fi
      if finished; then
        say "the run in ${OPT[workdir]} finished (launched $attempts time(s) by this supervisor)"
        if [[ -n ${OPT[delete-when-done]:-} ]]; then
          "$HERE/delete.sh" "${location[@]}" "${dry[@]}"
        fi
        exit 0
      fi
      if ((attempts >= max_attempts)); then
        say "giving up: the job was launched $max_attempts time(s) without finishing; see tpu/logs.sh" \
          "(the VM is left running: tpu/delete.sh deletes it)"
        exit 1
      fi
      attempts=$((attempts + 1))
      if ((!installed)); then
        say "attempt $attempts: ${OPT[name]} is ACTIVE; installing jaxlm"
        "$HERE/install.sh" "${install[@]}" "${dry[@]}"
        installed=1
      fi
      say "attempt $attempts: launching the job; it resumes from the last checkpoint in ${OPT[workdir]}"
      "$HERE/launch.sh" "${dry[@]}" "${launch[@]}"
      sleep "${OPT[poll-seconds]}"
      ;;
    "" | PREEMPTED | SUSPENDING | SUSPENDED | FAILED)
      if finished; then # preempted while `--eval` ran after training: the training itself is done
        say "the run in ${OPT[workdir]} finished; ${OPT[name]} is ${state:-gone}"
        exit 0
      fi
      if [[ -n $state ]]; then
        say "${OPT[name]} is $state; deleting and re-creating it"
        "$HERE/delete.sh" "${location[@]}" "${dry[@]}"
      else
        say "${OPT[name]} does not exist; creating it"
      fi
      "$HERE/create.sh" "${create[@]}" "${dry[@]}"
      installed=0
      if ((DRY_RUN)); then
        sleep "${OPT[poll-seconds]}" # nothing was created: look again after a poll, not at once
      fi
      ;;
    *) # ACCEPTED, WAITING_FOR_RESOURCES, PROVISIONING, CREATING, DELETING: not ours to change
      sleep "${OPT[poll-seconds]}"
      ;;
  esac
done
