#!/usr/bin/env bash
# Install the Debian packages the tests and `make run` need:
#   redis-server  - result-cache backend (tests start their own instances)
#   prometheus    - provides promtool, used to lint the /metrics output
#   haproxy       - used by tests that put a TCP proxy between components
# Idempotent: does nothing when all commands are already on PATH, and runs
# `apt-get update` at most once.
set -euo pipefail

# Debian puts haproxy in /usr/sbin, which non-login shells may lack.
export PATH="$PATH:/usr/sbin:/sbin"

missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
command -v redis-cli    >/dev/null || missing+=(redis-server)   # same package (via redis-tools)
command -v promtool     >/dev/null || missing+=(prometheus)
command -v haproxy      >/dev/null || missing+=(haproxy)

if [[ ${#missing[@]} -eq 0 ]]; then
  echo "system deps present: redis-server redis-cli promtool haproxy"
  exit 0
fi

# De-duplicate package names.
mapfile -t pkgs < <(printf '%s\n' "${missing[@]}" | sort -u)

SUDO=()
if [[ "$(id -u)" -ne 0 ]]; then SUDO=(sudo); fi

echo "installing: ${pkgs[*]}"
export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" apt-get update
"${SUDO[@]}" apt-get install -y --no-install-recommends "${pkgs[@]}"

# The Debian packages start system services; our tests and devstack start
# their own instances on other ports, so these are harmless and left alone.
for c in redis-server redis-cli promtool haproxy; do
  command -v "$c" >/dev/null || { echo "error: $c still missing" >&2; exit 1; }
done
echo "system deps installed"
