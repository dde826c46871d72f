#!/usr/bin/env bash
# Rebuilds examples/hello-oci, the small OCI layout the README's first command pulls.
# Needs buildah and skopeo (Debian packages) and root (or run it under `buildah unshare`).
# Deterministic timestamps so a rebuild gives the same digests.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
work="$(mktemp -d)"
trap 'buildah --root "$work/graph" --runroot "$work/run" rm -a >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
export SOURCE_DATE_EPOCH=1700000000
b=(buildah --root "$work/graph" --runroot "$work/run" --storage-driver vfs)

root="$work/rootfs"
mkdir -p "$root/usr/bin" "$root/usr/share/hello" "$root/etc"
cat > "$root/usr/bin/hello" <<'SH'
#!/bin/sh
echo "Hello from a composefs image pulled by splitfdstream."
SH
chmod 0755 "$root/usr/bin/hello"
echo "hello" > "$root/etc/hostname"
# One body under and several over composefs's 64-byte inline limit, so both paths are exercised.
printf 'tiny\n' > "$root/usr/share/hello/tiny.txt"
for i in 1 2 3; do
    head -c $((4096 * i)) /dev/zero | tr '\0' "$i" > "$root/usr/share/hello/file$i.txt"
done
ln -s hello "$root/usr/bin/hi"
ln "$root/usr/share/hello/file1.txt" "$root/usr/share/hello/file1-link.txt"
find "$root" -exec touch -h -d @"$SOURCE_DATE_EPOCH" {} +

c=$("${b[@]}" from scratch)
"${b[@]}" copy "$c" "$root/usr" /usr
"${b[@]}" commit --format oci --timestamp "$SOURCE_DATE_EPOCH" "$c" localhost/hello-base >/dev/null
c2=$("${b[@]}" from localhost/hello-base)
"${b[@]}" copy "$c2" "$root/etc" /etc
"${b[@]}" config --cmd /usr/bin/hello "$c2"
"${b[@]}" commit --format oci --timestamp "$SOURCE_DATE_EPOCH" "$c2" localhost/hello >/dev/null

rm -rf "$here/hello-oci"
skopeo copy -q "containers-storage:[vfs@$work/graph+$work/run]localhost/hello:latest" "oci:$here/hello-oci:hello"
echo "wrote $here/hello-oci"
