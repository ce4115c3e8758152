# shellcheck shell=bash
# Sourced by the experiments/*.sh scripts: JAXLM is the jaxlm command they run. Unless set already, the
# checkout's own (.venv/bin/jaxlm beside experiments/, as README.md installs it, no activation needed), else a
# jaxlm on PATH; neither is one line with the fix.
if [[ -z ${JAXLM:-} ]]; then
  _jaxlm_checkout=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  if [[ -x $_jaxlm_checkout/.venv/bin/jaxlm ]]; then
    JAXLM=$_jaxlm_checkout/.venv/bin/jaxlm
  elif command -v jaxlm >/dev/null; then
    JAXLM=jaxlm
  else
    echo "$0: no jaxlm: install it in $_jaxlm_checkout/.venv (README.md), put jaxlm on PATH, or set JAXLM" >&2
    exit 2
  fi
fi
