#!/usr/bin/env bash
# Benchmark: `splitfdstream pull` against `cfsctl oci pull --local-fetch auto`, same image, same
# run, warm and cold (page cache dropped), on XFS with reflink and on ext4 (both loop mounts).
# Ours runs twice: as it runs by default on this root-owned store (bodies hashed from the
# source, then reflinked: the trusted path) and with --untrusted-source (every body cloned
# first and its clone read: the path taken for stores others can write).
# Prints a Markdown table: wall time, CPU time, peak RSS, disk blocks used, ratio to cfsctl.
#
# usage (root): bench/run.sh [WORKDIR] [SCALE]     (SCALE 1.0 ≈ 2.7 GB, 92,000 files, 5 layers)
# env: CFSCTL (default: cfsctl on PATH or the CI cache), FILESYSTEMS (default "xfs ext4"),
#      HASH (default sha512), RUNS (default 1)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
work="${1:-/var/tmp/splitfdstream-bench}"
scale="${2:-1.0}"
hash="${HASH:-sha512}"
runs="${RUNS:-1}"
cfsctl="${CFSCTL:-$(command -v cfsctl || echo /var/cache/splitfdstream-ci/cfsctl/bin/cfsctl)}"
[ "$(id -u)" -eq 0 ] || { echo "bench/run.sh must run as root (loop mounts, drop_caches)" >&2; exit 1; }
[ -x "$cfsctl" ] || { echo "cfsctl not found (set CFSCTL)" >&2; exit 1; }
(cd "$here/.." && cargo build --release -q)
sfds="$here/../target/release/splitfdstream"
mkdir -p "$work"

mountfs() { # fs dir size
    local fs=$1 dir=$2 img="$work/$1.img"
    mkdir -p "$dir"
    mountpoint -q "$dir" && return 0
    rm -f "$img"; truncate -s "$3" "$img"
    case $fs in
        xfs) mkfs.xfs -q -m reflink=1 "$img" ;;
        ext4) mkfs.ext4 -q "$img" ;;
    esac
    mount -o loop "$img" "$dir"
}

# Used blocks of a filesystem, with deferred work done first: XFS frees the blocks of deleted
# inodes in the background (inodegc), so a plain `df` after `rm -rf` of the previous run's
# repository can still count them; freezing the filesystem flushes that work.
used_bytes() { # mountpoint
    sync
    fsfreeze -f "$1" && fsfreeze -u "$1"
    df -B1 --output=used "$1" | tail -1
}

# Where a repository's blocks go: object inodes, the EROFS image, object directories, streams.
breakdown() { # fs repo
    local fs=$1 repo=$2 isize objects erofs dirs streams
    # XFS allocates inodes (in 64-inode chunks) as files are made; ext4's inode tables are
    # preallocated by mkfs, so there object inodes cost no new blocks.
    case $fs in
        xfs) isize=$(xfs_info "$(stat -c %m "$repo")" | sed -n 's/.*isize=\([0-9]*\).*/\1/p' | head -1) ;;
        *) isize=0 ;;
    esac
    objects=$(find "$repo/objects" -type f | wc -l)
    erofs=$(find -L "$repo/images" -maxdepth 1 -type f -printf '%s\n' | awk '{s+=$1} END {print s+0}')
    dirs=$(find "$repo/objects" -type d -printf '%b\n' | awk '{s+=$1*512} END {print s+0}')
    streams=$(find -L "$repo/streams" -maxdepth 1 -name 'oci-*' -type f -printf '%s\n' | awk '{s+=$1} END {print s+0}')
    awk -v fs="$fs" -v n="$objects" -v i="$isize" -v e="$erofs" -v d="$dirs" -v s="$streams" 'BEGIN {
        m = 1048576
        inodes = i > 0 ? sprintf("%d-byte inodes = %.1f MiB", i, n*i/m) : "inodes preallocated by mkfs"
        printf "%s: %d objects (%s), EROFS image %.1f MiB, object directories %.1f MiB, splitstreams %.1f MiB\n", fs, n, inodes, e/m, d/m, s/m }'
}

measure() { # label cmd... ; prints "wall cpu rss_kib"
    local out; out=$(mktemp)
    /usr/bin/time -f '%e %U %S %M' -o "$out" "$@" >/dev/null 2>"$out.err" || { cat "$out.err" >&2; return 1; }
    awk '{printf "%s %.2f %s\n", $1, $2 + $3, $4}' "$out"
    rm -f "$out" "$out.err"
}

notes=""
echo "| fs | mode | tool | wall s | CPU s | peak RSS MiB | disk used MiB | wall ratio |"
echo "|---|---|---|---|---|---|---|---|"
# cfsctl only finds images in the default stores (it ignores storage.conf and the bracketed
# store syntax), so each filesystem is mounted AT the default graphroot for its turn.
graphroot=/var/lib/containers/storage
if mountpoint -q "$graphroot"; then umount "$graphroot"; fi
# (A bind mount over an existing store hides it for the run; nothing in it is touched.)
for fs in ${FILESYSTEMS:-xfs ext4}; do
    mnt="$work/$fs"
    mountfs "$fs" "$mnt" 40G
    mkdir -p "$mnt/storage" "$graphroot"
    mount --bind "$mnt/storage" "$graphroot"
    trap 'umount "$graphroot" 2>/dev/null || true' EXIT
    store="$graphroot"
    if [ ! -e "$store/.built" ]; then
        b=(buildah --storage-driver overlay)
        c=$("${b[@]}" from scratch)
        for layer in 0 1 2 3 4; do
            m=$("${b[@]}" mount "$c")
            python3 "$here/gen.py" "$m" "$layer" "$scale"
            "${b[@]}" umount "$c" >/dev/null
            "${b[@]}" commit -q "$c" localhost/bench:latest >/dev/null
            "${b[@]}" rm "$c" >/dev/null
            c=$("${b[@]}" from localhost/bench:latest)
        done
        "${b[@]}" rm "$c" >/dev/null
        touch "$store/.built"
    fi
    src="containers-storage:localhost/bench:latest"
    image_bytes=$(du -sb "$store/overlay" | cut -f1)
    # Without kernel fs-verity here, both tools need an insecure repository.
    insecure=()
    probe="$mnt/verity-probe"
    rm -rf "$probe"
    "$cfsctl" --repo "$probe" init --algorithm "fsverity-$hash-12" >/dev/null 2>&1 || insecure=(--insecure)
    rm -rf "$probe"
    for mode in warm cold; do
        for run in $(seq "$runs"); do
            declare -A wall
            for tool in splitfdstream splitfdstream-untrusted cfsctl; do
                repo="$mnt/repo-$tool"
                rm -rf "$repo"
                before=$(used_bytes "$mnt")
                if [ "$mode" = cold ]; then echo 3 > /proc/sys/vm/drop_caches; else tar -cf - "$store/overlay" 2>/dev/null | cat >/dev/null; fi
                case $tool in
                    splitfdstream)
                        r=$(measure "$sfds" pull "$src" --repo "$repo" --hash "$hash" --tag bench "${insecure[@]}") ;;
                    splitfdstream-untrusted)
                        r=$(measure "$sfds" pull "$src" --repo "$repo" --hash "$hash" --tag bench "${insecure[@]}" --untrusted-source) ;;
                    cfsctl)
                        "$cfsctl" --repo "$repo" init --algorithm "fsverity-$hash-12" "${insecure[@]}" >/dev/null
                        r=$(measure "$cfsctl" --repo "$repo" oci pull --local-fetch auto "$src" bench) ;;
                esac
                after=$(used_bytes "$mnt")
                read -r w c m <<<"$r"
                wall[$tool]=$w
                used=$(( (after - before) / 1048576 ))
                ratio=""
                if [ "$tool" = cfsctl ]; then
                    ratio=$(awk -v a="${wall[splitfdstream]}" -v u="${wall[splitfdstream-untrusted]}" -v b="$w" \
                        'BEGIN{printf "splitfdstream/cfsctl = %.2f, untrusted/cfsctl = %.2f, untrusted/trusted = %.2f", a/b, u/b, u/a}')
                fi
                echo "| $fs | $mode | $tool | $w | $c | $((m / 1024)) | $used ($(awk -v u="$((after - before))" -v t="$image_bytes" 'BEGIN{printf "%.2f%%", 100*u/t}')) | $ratio |"
            done
        done
    done
    notes+="$(breakdown "$fs" "$mnt/repo-splitfdstream")"$'\n'
    umount "$graphroot"
done
echo
printf '%s' "$notes"
