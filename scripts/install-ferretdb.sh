#!/usr/bin/env bash
# Build FerretDB (the MongoDB-compatible upstream used by tests and `make run`)
# into .tools/bin/ferretdb.  Idempotent: does nothing if the binary already
# reports the wanted version.
#
# Why not `go install github.com/FerretDB/FerretDB/cmd/ferretdb@VERSION`?
#   * the Go proxy answers 403 for the module's @v/list (deprecation lookup),
#     so `go install pkg@version` fails here;
#   * the module zip ships an empty build/version/version.txt, and FerretDB
#     panics at startup when it is empty.
# So: download the module source with `go mod download`, copy it out of the
# read-only module cache, fill in version.txt and `go build` it in place.
#
# Env: FERRETDB_BIN  output path (default <repo>/.tools/bin/ferretdb)
#      GO            go binary (default: `go` on PATH, else /usr/local/go/bin/go)
set -euo pipefail

VERSION=v1.24.2
MODULE=github.com/FerretDB/FerretDB

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${FERRETDB_BIN:-$ROOT/.tools/bin/ferretdb}"

# The version is captured before grep reads it: with pipefail, `ferretdb --version |
# grep -q` fails whenever grep exits before ferretdb has written its last line (SIGPIPE).
reports_version() {
  local out
  out="$("$OUT" --version 2>/dev/null)" || return 1
  grep -q "^version: $VERSION\$" <<<"$out"
}

if [[ -x "$OUT" ]] && reports_version; then
  echo "ferretdb $VERSION already at $OUT"
  exit 0
fi

GO="${GO:-$(command -v go || true)}"
if [[ -z "$GO" && -x /usr/local/go/bin/go ]]; then GO=/usr/local/go/bin/go; fi
if [[ -z "$GO" ]]; then
  echo "error: Go toolchain not found (set GO=/path/to/go)" >&2
  exit 1
fi

WORK="$(mktemp -d)"
# The copied module tree is read-only in parts; make it removable on exit.
trap 'chmod -R u+w "$WORK" 2>/dev/null || true; rm -rf "$WORK"' EXIT

echo "building ferretdb $VERSION with $("$GO" version) (takes 1-3 minutes cold)..."

# `go mod download` needs a module context; a throwaway one is enough.
mkdir "$WORK/mod"
cd "$WORK/mod"
"$GO" mod init tmpbuild >/dev/null 2>&1

download() { "$GO" mod download -json "$MODULE@$VERSION"; }
if ! INFO="$(download)"; then
  # The checksum database may be unreachable from sandboxed machines.
  echo "go mod download failed; retrying with GOSUMDB=off" >&2
  INFO="$(GOSUMDB=off download)"
fi
# Extract the "Dir" field without needing jq.
SRC="$(printf '%s\n' "$INFO" | sed -n 's/^[[:space:]]*"Dir":[[:space:]]*"\(.*\)",\{0,1\}$/\1/p')"
if [[ -z "$SRC" || ! -d "$SRC" ]]; then
  echo "error: could not find module dir in go mod download output:" >&2
  printf '%s\n' "$INFO" >&2
  exit 1
fi

cp -r "$SRC" "$WORK/src"
chmod -R u+w "$WORK/src"
echo "$VERSION" > "$WORK/src/build/version/version.txt"

mkdir -p "$(dirname "$OUT")"
cd "$WORK/src"
# Build to a temp name and move into place so a failed build never leaves a
# half-written binary that a later run might trust.
if ! "$GO" build -trimpath -o "$OUT.tmp" ./cmd/ferretdb; then
  echo "go build failed; retrying with GOSUMDB=off" >&2
  GOSUMDB=off "$GO" build -trimpath -o "$OUT.tmp" ./cmd/ferretdb
fi
mv -f "$OUT.tmp" "$OUT"

"$OUT" --version
reports_version || {
  echo "error: built binary does not report $VERSION" >&2
  exit 1
}
echo "ferretdb $VERSION installed at $OUT"
