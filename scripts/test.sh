#!/usr/bin/env bash
# Runs every test file with node's test runner. The file list comes from the
# shell (node 20 does not expand quoted globs, and a bare --test finds none).
set -euo pipefail
cd "$(dirname "$0")/.."
mapfile -t files < <(find services clients common tests deploy -name '*.test.ts' -not -path '*/node_modules/*' 2>/dev/null | sort)
if [ "${#files[@]}" -eq 0 ]; then
  echo "no test files found" >&2
  exit 1
fi
exec node --import tsx --test "$@" "${files[@]}"
