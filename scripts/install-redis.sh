#!/usr/bin/env bash
# Ensure redis-server and redis-cli exist (tests start their own instances).
# Kept for callers that need only Redis; install-system-deps.sh covers it too.
set -euo pipefail
if command -v redis-server >/dev/null && command -v redis-cli >/dev/null; then
  echo "redis present: $(redis-server --version | head -n1)"
  exit 0
fi
SUDO=()
if [[ "$(id -u)" -ne 0 ]]; then SUDO=(sudo); fi
export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" apt-get update
"${SUDO[@]}" apt-get install -y --no-install-recommends redis-server
command -v redis-server >/dev/null && command -v redis-cli >/dev/null
