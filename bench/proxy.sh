#!/usr/bin/env bash
# Benchmark: GetBlob of every layer of the given containers-storage images through our image
# proxy and through skopeo's, with the same client (the crate containers-image-proxy), in one
# run: wall time, CPU time and peak RSS (largest process: client, proxy or helper). Warm cache:
# one untimed pass of each first.
#
# usage (root): bench/proxy.sh --scale SCALE [WORKDIR]   the bench image of bench/gen.py (5 layers,
#                                                        SCALE 1.0 ≈ 2.7 GB; 0.3 for a quick run),
#                                                        built once in a store under WORKDIR
#        bench/proxy.sh IMAGE…
#   IMAGE: a full name, e.g. 'containers-storage:[overlay@/g+/r]localhost/big:latest'
# Prints a Markdown table and the wall-time ratio.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
[ "$#" -gt 0 ] || { echo "usage: bench/proxy.sh --scale SCALE [WORKDIR] | IMAGE…" >&2; exit 2; }
command -v skopeo >/dev/null || { echo "skopeo not installed" >&2; exit 1; }
if [ "$1" = --scale ]; then
    scale="$2"
    work="${3:-/var/tmp/splitfdstream-bench-proxy}/scale-$scale"
    # podman and buildah refuse a run root longer than 50 bytes.
    graph="$work/graph" run="/run/sfds-bench-proxy-$scale"
    store=(--storage-driver overlay --root "$graph" --runroot "$run")
    if [ ! -e "$work/.built" ]; then
        command -v buildah >/dev/null || { echo "buildah not installed" >&2; exit 1; }
        mkdir -p "$graph"
        c=$(buildah "${store[@]}" from scratch)
        for layer in 0 1 2 3 4; do
            m=$(buildah "${store[@]}" mount "$c")
            python3 "$here/gen.py" "$m" "$layer" "$scale"
            buildah "${store[@]}" umount "$c" >/dev/null
            buildah "${store[@]}" commit -q "$c" localhost/bench:latest >/dev/null
            buildah "${store[@]}" rm "$c" >/dev/null
            c=$(buildah "${store[@]}" from localhost/bench:latest)
        done
        buildah "${store[@]}" rm "$c" >/dev/null
        touch "$work/.built"
    fi
    set -- "containers-storage:[overlay@$graph+$run]localhost/bench:latest"
    echo "bench image at scale $scale: $(du -sh "$graph/overlay" | cut -f1)"
fi
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
