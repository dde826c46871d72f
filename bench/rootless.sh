#!/usr/bin/env bash
# Benchmark: a rootless `splitfdstream pull` (a user reading their own podman store, the helper
# in a user namespace of its own) against a root pull of the same image, in the same run, on
# one XFS loop mount with reflink. The image is bench/gen.py's (as bench/run.sh builds it),
# built into a root store with buildah and copied into the user's rootless store by podman.
# Prints a Markdown table: wall time, CPU time, peak RSS, ratio rootless/root.
#
# usage (root): bench/rootless.sh [WORKDIR] [SCALE]
# env: RUNS (default 2), HASH (default sha512), BENCH_USER (default sfds-bench)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
work="${1:-/var/tmp/splitfdstream-bench-rootless}"
scale="${2:-1.0}"
hash="${HASH:-sha512}"
runs="${RUNS:-2}"
user="${BENCH_USER:-sfds-bench}"
[ "$(id -u)" -eq 0 ] || { echo "bench/rootless.sh must run as root" >&2; exit 1; }
(cd "$here/.." && cargo build --release -q)
mkdir -p "$work"
mnt="$work/xfs"
if ! mountpoint -q "$mnt"; then
    mkdir -p "$mnt"
    rm -f "$work/xfs.img"
    truncate -s 40G "$work/xfs.img"
    mkfs.xfs -q -m reflink=1 "$work/xfs.img"
    mount -o loop "$work/xfs.img" "$mnt"
fi
chmod 755 "$work" "$mnt"

# The user, with subordinate ids, and the binary where the user can run it.
id "$user" >/dev/null 2>&1 || useradd --create-home --shell /bin/sh "$user"
grep -q "^$user:" /etc/subuid || usermod --add-subuids 500000-565535 "$user"
grep -q "^$user:" /etc/subgid || usermod --add-subgids 500000-565535 "$user"
uid=$(id -u "$user")
install -m 0755 "$here/../target/release/splitfdstream" "$mnt/splitfdstream"
sfds="$mnt/splitfdstream"

# Root's store, with the image.
rg="$mnt/root-graph" rr="$work/root-run"
B() { buildah --storage-driver overlay --root "$rg" --runroot "$rr" "$@"; }
if [ ! -e "$rg/.built" ]; then
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
    touch "$rg/.built"
fi

# The user's rootless store, on the same filesystem, with the same image.
ud="$mnt/user"
conf="$ud/storage.conf" runtime="$ud/runtime"
mkdir -p "$ud" "$runtime"
chown "$user:" "$ud" "$runtime"
chmod 700 "$runtime"
printf '[storage]\ndriver = "overlay"\nrootless_storage_path = "%s"\n' "$ud/storage" >"$conf"
as_user() {
    runuser -u "$user" -- env -i HOME="/home/$user" XDG_RUNTIME_DIR="$runtime" \
        CONTAINERS_STORAGE_CONF="$conf" PATH=/usr/sbin:/usr/bin:/sbin:/bin "$@"
}
if [ ! -e "$ud/.built" ]; then
    layout="$mnt/bench-oci"
    rm -rf "$layout"
    skopeo copy --quiet --dest-oci-accept-uncompressed-layers \
        "containers-storage:[overlay@$rg+$rr]localhost/bench:latest" "oci:$layout:bench"
    chmod -R a+rX "$layout"
    # podman names an image pulled from a layout after the layout's path: tag it as root's is.
    id=$(as_user podman pull --quiet "oci:$layout:bench")
    as_user podman tag "$id" localhost/bench:latest
    rm -rf "$layout"
    touch "$ud/.built"
fi

measure() { # cmd... ; prints "wall cpu rss_kib"
    local out; out=$(mktemp)
    /usr/bin/time -f '%e %U %S %M' -o "$out" "$@" >/dev/null 2>"$out.err" || { cat "$out.err" >&2; return 1; }
    awk '{printf "%s %.2f %s\n", $1, $2 + $3, $4}' "$out"
    rm -f "$out" "$out.err"
}

echo "| mode | pull | wall s | CPU s | peak RSS MiB | wall ratio |"
echo "|---|---|---|---|---|---|"
for mode in warm cold; do
    for run in $(seq "$runs"); do
        declare -A wall
        for who in root rootless; do
            repo="$mnt/repo-$who"
            rm -rf "$repo"
            sync
            if [ "$mode" = cold ]; then
                echo 3 > /proc/sys/vm/drop_caches
            else
                tar -cf - "$rg/overlay" "$ud/storage/overlay" 2>/dev/null | cat >/dev/null
            fi
            if [ "$who" = root ]; then
                r=$(measure "$sfds" pull "containers-storage:[overlay@$rg+$rr]localhost/bench:latest" \
                    --repo "$repo" --hash "$hash" --tag bench --insecure)
            else
                mkdir -p "$repo.d" && chown "$user:" "$repo.d"
                repo="$repo.d/repo"
                r=$(measure runuser -u "$user" -- env -i HOME="/home/$user" XDG_RUNTIME_DIR="$runtime" \
                    CONTAINERS_STORAGE_CONF="$conf" PATH=/usr/bin:/bin \
                    "$sfds" pull containers-storage:localhost/bench:latest --repo "$repo" \
                    --hash "$hash" --tag bench --insecure)
            fi
            read -r w c m <<<"$r"
            wall[$who]=$w
            ratio=""
            [ "$who" = rootless ] && ratio=$(awk -v a="${wall[rootless]}" -v b="${wall[root]}" 'BEGIN{printf "rootless/root = %.2f", a/b}')
            echo "| $mode | $who | $w | $c | $((m / 1024)) | $ratio |"
            rm -rf "$mnt/repo-$who" "$mnt/repo-$who.d"
        done
    done
done
echo
echo "uid $uid; subordinate ranges: $(grep "^$user:" /etc/subuid)"
