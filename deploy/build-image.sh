#!/usr/bin/env bash
# Builds the container image that deploy/compose.yaml runs (coordinator and workers
# alike) from berth's own binaries, without any registry: Debian's busybox-static in
# an empty root, the three binaries and the shared libraries `ldd` lists for them
# (none for static binaries), deploy/coordinator.toml as /etc/berth/coordinator.toml
# and the two entrypoint scripts, imported with `docker import`.
#
#   deploy/build-image.sh [--bin-dir DIR] [--tag TAG] [--label KEY=VALUE]... [--busybox-deb FILE]
#
#   --bin-dir      where berth, berth-coordinator and berth-worker were built
#                  (default: target/release of this checkout)
#   --tag          the image's name (default: berth:local, what compose.yaml runs)
#   --label        a label on the image (repeatable)
#   --busybox-deb  a busybox-static .deb already downloaded (default: `apt-get download`)
#
# Prints the image id on stdout. Needs docker, dpkg-deb, ldd and tar; strip is used
# when present (debug builds shrink tenfold).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
bin_dir=$here/../target/release
tag=berth:local
labels=()
deb=

usage() {
    sed -n '8,16p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

while [ $# -gt 0 ]; do
    case "$1" in
        --bin-dir) bin_dir=${2:?--bin-dir needs a directory}; shift 2 ;;
        --tag) tag=${2:?--tag needs a name}; shift 2 ;;
        --label) labels+=("${2:?--label needs KEY=VALUE}"); shift 2 ;;
        --busybox-deb) deb=${2:?--busybox-deb needs a file}; shift 2 ;;
        -h | --help) usage ;;
        *) echo "build-image.sh: unknown argument \`$1\`" >&2; usage ;;
    esac
done

for b in berth berth-coordinator berth-worker; do
    if [ ! -x "$bin_dir/$b" ]; then
        echo "build-image.sh: $bin_dir/$b is missing: build it first (cargo build --release -p berth -p berth-coordinator -p berth-worker) or pass --bin-dir" >&2
        exit 2
    fi
done

work=$(mktemp -d -t berth-image.XXXXXX)
trap 'rm -rf "$work"' EXIT
root=$work/root

if [ -z "$deb" ]; then
    mkdir "$work/dl"
    # Readable by apt's unprivileged download user.
    chmod 0755 "$work" "$work/dl"
    if ! (cd "$work/dl" && apt-get download -qq busybox-static); then
        echo "build-image.sh: apt-get download busybox-static failed (try \`apt-get update\` first)" >&2
        exit 1
    fi
    deb=$(ls "$work"/dl/*.deb)
fi
dpkg-deb -x "$deb" "$work/deb"

mkdir -p "$root"/{bin,etc/berth,tmp,root,usr/local/bin,var/lib/berth,var/lib/berth-worker,bootstrap}
chmod 1777 "$root/tmp"
# The coordinator keeps its data dir (the CA key) to itself.
chmod 0700 "$root/var/lib/berth"
cp "$work/deb/bin/busybox" "$root/bin/busybox"
for applet in $("$root/bin/busybox" --list); do
    [ "$applet" = busybox ] || ln -s busybox "$root/bin/$applet"
done
printf 'root:x:0:0:root:/root:/bin/sh\n' > "$root/etc/passwd"
printf 'root:x:0:\n' > "$root/etc/group"
printf 'hosts: files dns\n' > "$root/etc/nsswitch.conf"

for b in berth berth-coordinator berth-worker; do
    if command -v strip > /dev/null; then
        strip -o "$root/usr/local/bin/$b" "$bin_dir/$b"
    else
        cp "$bin_dir/$b" "$root/usr/local/bin/$b"
    fi
    # `ldd` lines: `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)` and the
    # loader as `/lib64/ld-linux-x86-64.so.2 (0x...)`; a static binary lists none.
    for lib in $(ldd "$bin_dir/$b" 2> /dev/null | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }'); do
        mkdir -p "$root$(dirname "$lib")"
        cp -L "$lib" "$root$lib"
    done
done
install -m 0644 "$here/coordinator.toml" "$root/etc/berth/coordinator.toml"
install -m 0755 "$here/entrypoint-coordinator.sh" "$root/usr/local/bin/entrypoint-coordinator"
install -m 0755 "$here/entrypoint-worker.sh" "$root/usr/local/bin/entrypoint-worker"

changes=(-c 'ENV PATH=/usr/local/bin:/bin' -c 'CMD ["/bin/sh"]')
for l in "${labels[@]}"; do
    changes+=(-c "LABEL $l")
done
tar --numeric-owner --owner=0 --group=0 -C "$root" -c . | docker import "${changes[@]}" - "$tag" > "$work/id"
cat "$work/id"
