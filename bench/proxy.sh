#!/usr/bin/env bash
# Benchmark: GetBlob of every layer of the given containers-storage images through our image
# proxy and through skopeo's, with the same client (the crate containers-image-proxy), in one
# run: wall time, CPU time and peak RSS (largest process: client, proxy or helper). Warm cache:
# one untimed pass of each first.
#
# usage (root for the default store): bench/proxy.sh IMAGE…
#   IMAGE: a full name, e.g. 'containers-storage:[overlay@/g+/r]localhost/big:latest'
# Prints a Markdown table and the wall-time ratio.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
[ "$#" -gt 0 ] || { echo "usage: bench/proxy.sh IMAGE…" >&2; exit 2; }
command -v skopeo >/dev/null || { echo "skopeo not installed" >&2; exit 1; }
(cd "$here/.." && cargo build --release -q --bin splitfdstream --example proxy_fetch)
fetch="$here/../target/release/examples/proxy_fetch"
ours="$here/../target/release/splitfdstream"

measure() { # program; prints "wall cpu rss_kib"
    local out; out=$(mktemp)
    /usr/bin/time -f '%e %U %S %M' -o "$out" "$fetch" "$1" "${images[@]}" >/dev/null 2>"$out.err" \
        || { cat "$out.err" >&2; return 1; }
    awk '{printf "%s %.2f %s\n", $1, $2 + $3, $4}' "$out"
    rm -f "$out" "$out.err"
}

images=("$@")
"$fetch" "$ours" "${images[@]}" >/dev/null
"$fetch" skopeo "${images[@]}" >/dev/null
read -r ow oc or < <(measure "$ours")
read -r sw sc sr < <(measure skopeo)
version=$(skopeo --version | awk '{print $3}')
awk -v ow="$ow" -v oc="$oc" -v orss="$or" -v sw="$sw" -v sc="$sc" -v sr="$sr" -v v="$version" 'BEGIN {
    print "| proxy | wall s | CPU s | peak RSS MiB |"
    print "|---|---|---|---|"
    printf "| splitfdstream | %s | %s | %.0f |\n", ow, oc, orss / 1024
    printf "| skopeo %s | %s | %s | %.0f |\n", v, sw, sc, sr / 1024
    printf "wall-time ratio skopeo/splitfdstream: %.1fx\n", sw / ow }'
