#!/usr/bin/env bash
# Usage: tpu/supervise.sh --name NAME --zone ZONE --project PROJECT
#            --accelerator-type TYPE --config CONFIG --workdir gs://BUCKET/RUN
#            [--runtime-version V] [--repo URL_OR_DIR] [--ref REF] [--eval]
#            [--max-attempts N] [--poll-seconds S] [--delete-when-done]
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
# than --max-attempts times (default 5). With --dry-run it still looks
# (queued-resource describe, ssh pgrep, storage cat) but prints the commands
# that would change anything instead of running them.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR disable=SC1091
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
HERE=$(dirname "${BASH_SOURCE[0]}")

OPT[max-attempts]=5
OPT[poll-seconds]=60
parse_args "name= zone= project= accelerator-type= config= workdir= runtime-version= repo= ref= eval max-attempts= poll-seconds= delete-when-done --" "$@"
require name zone project accelerator-type config workdir max-attempts poll-seconds
[[ ${OPT[workdir]} == gs://?* ]] || usage_error "--workdir must be a gs:// URL: a re-created VM finds the checkpoints only there"
[[ ${OPT[max-attempts]} =~ ^[1-9][0-9]*$ ]] || usage_error "--max-attempts must be a positive integer"
[[ ${OPT[poll-seconds]} =~ ^[0-9]+$ ]] || usage_error "--poll-seconds must be a whole number of seconds"

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

# The queued resource's state, or "" when it does not exist (or cannot be read).
resource_state() {
  gcloud compute tpus queued-resources describe "${OPT[name]}" --format='value(state.state)' \
    --zone "${OPT[zone]}" --project "${OPT[project]}" 2>/dev/null || true
}

# Whether `jaxlm train` runs on worker 0. "[j]axlm" keeps pgrep from matching the shell running it.
job_running() {
  local answer
  answer=$(gcloud compute tpus tpu-vm ssh "${OPT[name]}" --zone "${OPT[zone]}" --project "${OPT[project]}" \
    --worker=0 --command 'pgrep -f "[j]axlm train" > /dev/null && echo running || echo stopped' 2>/dev/null) || true
  [[ $answer == running ]]
}

# Whether the run wrote a train_summary.json that says it reached train.num_steps.
finished() {
  local summary pattern='"stop_reason"[[:space:]]*:[[:space:]]*"finished"'
  summary=$(gcloud storage cat "${OPT[workdir]%/}/train_summary.json" 2>/dev/null) || return 1
  [[ $summary =~ $pattern ]]
}

max_attempts=${OPT[max-attempts]}
attempts=0
installed=0 # whether this VM has had jaxlm installed by this supervisor
while true; do
  state=$(resource_state)
  case $state in
    ACTIVE)
      if job_running; then
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
