#!/usr/bin/env bash
# Benchmark of the other sinks, same image, same run, warm and cold (page cache dropped), on one
# XFS loop mount with reflink that holds both the store and every output:
#   unpack:  `splitfdstream unpack`  vs  `podman create` + `podman export | tar -x`
#            vs  `skopeo copy … oci:` + `umoci unpack`
#            (and, for reference, `cp -a --reflink=always` of the layers' diff dirs: the
#            filesystem's cost of making that many reflinked files)
#   export:  `splitfdstream export --compress none`  vs  `skopeo copy` to an uncompressed OCI
#            layout; and `--compress gzip` vs skopeo's default (gzip)
# Prints a Markdown table: wall time, CPU time, peak RSS, disk blocks used (filesystem delta, so
# reflinked extents count as free), and each tool's wall time over splitfdstream's.
#
# usage (root): bench/unpack.sh [WORKDIR] [SCALE]   (SCALE 1.0 ≈ 2.7 GB, 92,000 files, 5 layers)
# env: RUNS (default 1), MODES (default "warm cold"), TASKS (default "unpack none gzip")
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
work="${1:-/var/tmp/splitfdstream-bench-unpack}"
scale="${2:-1.0}"
runs="${RUNS:-1}"
[ "$(id -u)" -eq 0 ] || { echo "bench/unpack.sh must run as root (loop mounts, drop_caches)" >&2; exit 1; }
for tool in podman buildah skopeo umoci /usr/bin/time fsfreeze; do
    command -v "$tool" >/dev/null || { echo "bench/unpack.sh: $tool not found" >&2; exit 1; }
done
(cd "$here/.." && cargo build --release -q)
sfds="$here/../target/release/splitfdstream"
mkdir -p "$work"
mnt="$work/xfs"
if ! mountpoint -q "$mnt"; then
    mkdir -p "$mnt"
    rm -f "$work/xfs.img"
    truncate -s 60G "$work/xfs.img"
    mkfs.xfs -q -m reflink=1 "$work/xfs.img"
    mount -o loop "$work/xfs.img" "$mnt"
fi
graph="$mnt/graph"
# podman refuses a run root longer than 50 bytes, and its database remembers the first one:
# the same short path for the same WORKDIR.
run_root=/tmp/sfds-bench-run.$(printf '%s' "$work" | sha256sum | cut -c1-12)
mkdir -p "$run_root"
trap 'podman --root "$graph" --runroot "$run_root" rm -af >/dev/null 2>&1 || true; umount -l "$graph/overlay" 2>/dev/null || true; rm -rf "$run_root"' EXIT
P() { podman --storage-driver overlay --root "$graph" --runroot "$run_root" "$@"; }
B() { buildah --storage-driver overlay --root "$graph" --runroot "$run_root" "$@"; }
if [ ! -e "$mnt/.built-$scale" ]; then
    rm -rf "$graph" && mkdir -p "$graph"
    c=$(B from scratch)
    for layer in 0 1 2 3 4; do
        m=$(B mount "$c")
        python3 "$here/gen.py" "$m" "$layer" "$scale"
        B umount "$c" >/dev/null
        B commit -q "$c" localhost/bench:latest >/dev/null
        B rm "$c" >/dev/null
        c=$(B from localhost/bench:latest)
    done
    B rm "$c" >/dev/null
    touch "$mnt/.built-$scale"
fi
src="containers-storage:[overlay@$graph+$run_root]localhost/bench:latest"
image_bytes=$(du -sb "$graph/overlay" | cut -f1)

# Used bytes of the filesystem, after XFS's deferred inode work (freezing flushes it), so a
# previous run's deleted output is not counted.
used_bytes() {
    sync
    fsfreeze -f "$mnt" && fsfreeze -u "$mnt"
    df -B1 --output=used "$mnt" | tail -1
}

measure() { # cmd... ; prints "wall cpu rss_kib"
    local out; out=$(mktemp)
    /usr/bin/time -f '%e %U %S %M' -o "$out" "$@" >/dev/null 2>"$out.err" || { cat "$out.err" >&2; return 1; }
    awk '{printf "%s %.2f %s\n", $1, $2 + $3, $4}' "$out"
    rm -f "$out" "$out.err"
}

outputs() { rm -rf "$mnt/out" "$mnt/oci" "$mnt/bundle"; }

run_tool() { # tool
    case $1 in
        unpack) measure "$sfds" unpack "$src" "$mnt/out" ;;
        # Not an unpack (no whiteouts applied, one tree per layer): the floor of making these
        # files as reflinks on this filesystem, for reference.
        cp-reflink)
            measure bash -c 'mkdir "$2"; for d in "$1"/overlay/*/diff; do
                cp -a --reflink=always "$d" "$2/$(basename "$(dirname "$d")")"; done' \
                _ "$graph" "$mnt/out" ;;
        podman-export)
            measure bash -c 'set -eo pipefail
                c=$(podman --storage-driver overlay --root "$1" --runroot "$2" create -q localhost/bench:latest true)
                mkdir "$3"
                podman --storage-driver overlay --root "$1" --runroot "$2" export "$c" \
                    | tar --xattrs --xattrs-include="*" --numeric-owner -xpf - -C "$3"
                podman --storage-driver overlay --root "$1" --runroot "$2" rm "$c" >/dev/null' \
                _ "$graph" "$run_root" "$mnt/out" ;;
        skopeo-umoci)
            measure bash -c 'set -e
                skopeo copy --quiet --dest-oci-accept-uncompressed-layers "$1" "oci:$2:bench"
                umoci unpack --image "$2:bench" "$3"' _ "$src" "$mnt/oci" "$mnt/bundle" ;;
        export-none) measure "$sfds" export "$src" "oci:$mnt/oci:bench" --compress none ;;
        skopeo-none)
            measure skopeo copy --quiet --dest-oci-accept-uncompressed-layers "$src" "oci:$mnt/oci:bench" ;;
        export-gzip) measure "$sfds" export "$src" "oci:$mnt/oci:bench" --compress gzip ;;
        skopeo-gzip) measure skopeo copy --quiet "$src" "oci:$mnt/oci:bench" ;;
    esac
}

echo "image: $((image_bytes / 1048576)) MiB in the store (scale $scale)"
echo
echo "| mode | task | tool | wall s | CPU s | peak RSS MiB | disk used MiB | wall / splitfdstream |"
echo "|---|---|---|---|---|---|---|---|"
for mode in ${MODES:-warm cold}; do
    for run in $(seq "$runs"); do
        for group in "unpack:unpack cp-reflink podman-export skopeo-umoci" "export none:export-none skopeo-none" \
                     "export gzip:export-gzip skopeo-gzip"; do
            task=${group%%:*}
            case " ${TASKS:-unpack none gzip} " in *" ${task#export }"*) ;; *) continue ;; esac
            base=""
            for tool in ${group#*:}; do
                outputs
                before=$(used_bytes)
                if [ "$mode" = cold ]; then
                    echo 3 >/proc/sys/vm/drop_caches
                else
                    tar -cf - "$graph/overlay" 2>/dev/null | cat >/dev/null
                fi
                r=$(run_tool "$tool")
                after=$(used_bytes)
                read -r w c m <<<"$r"
                [ -n "$base" ] || base=$w
                used=$(( (after - before) / 1048576 ))
                pct=$(awk -v u="$((after - before))" -v t="$image_bytes" 'BEGIN{printf "%.1f%%", 100*u/t}')
                ratio=$(awk -v a="$w" -v b="$base" 'BEGIN{ if (b > 0) printf "%.1f", a/b; else print "-" }')
                echo "| $mode | $task | $tool | $w | $c | $((m / 1024)) | $used ($pct) | $ratio |"
            done
        done
    done
done
outputs
