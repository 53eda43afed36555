#!/usr/bin/env bash
# Write infra/.env from infra/.env.example with a fresh random value for every empty secret
# (openssl rand -hex 24; PREFECT_API_AUTH_STRING becomes asft:<hex>). Never overwrites an existing
# file: to rotate, edit infra/.env (see the "Security" section of infra/README.md).
#   bash infra/make-env.sh [OUTPUT]        # default OUTPUT: infra/.env (created with mode 600)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here/.env}
if [ -e "$out" ]; then
  echo "$out exists; not overwriting it (edit it, or remove it first)" >&2
  exit 1
fi
rand() {
  if command -v openssl >/dev/null 2>&1; then openssl rand -hex 24
  else od -An -N24 -tx1 /dev/urandom | tr -d ' \n'; fi
}
umask 077
tmp=$(mktemp "$out.XXXXXX")
trap 'rm -f "$tmp"' EXIT
while IFS= read -r line || [ -n "$line" ]; do
  case "$line" in
    PREFECT_API_AUTH_STRING=) echo "PREFECT_API_AUTH_STRING=asft:$(rand)" ;;
    [A-Z]*=) echo "${line}$(rand)" ;;
    *) printf '%s\n' "$line" ;;
  esac
done <"$here/.env.example" >"$tmp"
mv "$tmp" "$out"
trap - EXIT
echo "wrote $out (mode 600); keep it out of git and back it up like any other secret" >&2
