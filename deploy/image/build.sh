#!/usr/bin/env bash
# Builds keycard's two images with no registry:
#   keycard:dev       the static binary (musl) on scratch, uid 1337, HEALTHCHECK keycard healthcheck
#   keycard-init:dev  the same binary plus this machine's iptables, for `keycard iptables`
# Usage: bash deploy/image/build.sh   (KEYCARD_TAG=... to tag otherwise)
set -euo pipefail
cd "$(dirname "$0")/../.."
target=x86_64-unknown-linux-musl
tag=${KEYCARD_TAG:-dev}

# musl (its resolver reads /etc/resolv.conf and /etc/hosts with no NSS modules, as scratch needs);
# where the target cannot be fetched, glibc linked statically (KEYCARD_STATIC=gnu forces it).
if [ "${KEYCARD_STATIC:-musl}" = musl ] && ! rustup target list --installed | grep -qx "$target"; then
  rustup target add "$target" || { echo "build.sh: no musl target; linking glibc statically" >&2; KEYCARD_STATIC=gnu; }
fi
if [ "${KEYCARD_STATIC:-musl}" = gnu ]; then
  target=x86_64-unknown-linux-gnu
  export RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static"
fi
need=()
[ "$target" = x86_64-unknown-linux-musl ] && ! command -v musl-gcc >/dev/null && need+=(musl-tools)
command -v iptables >/dev/null || need+=(iptables)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
fi
cargo build --release --locked --target "$target" --bin keycard
# The image gets a stripped copy (the release profile keeps line tables for profiling).
mkdir -p target/image
bin=target/image/keycard
strip -o "$bin" "target/$target/release/keycard"
ldd "$bin" 2>&1 | grep -Eq 'not a dynamic|statically linked' || { echo "build.sh: $bin is not static" >&2; exit 1; }

# The legacy builder: this machine has no buildx, and nothing here needs BuildKit.
export DOCKER_BUILDKIT=0
docker build -q -t "keycard:$tag" -f Dockerfile . >/dev/null
echo "built keycard:$tag ($(docker image inspect -f '{{.Size}}' "keycard:$tag") bytes)"

# keycard-init: a root file system of the keycard binary and iptables, copied from this machine.
ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
root="$ctx/rootfs"
mkdir -p "$root/usr/local/bin" "$root/usr/sbin" "$root/usr/lib" "$root/usr/lib64" "$root/etc" "$root/run" "$root/tmp"
# Merged /usr, as Debian: /lib/... and /usr/lib/... are the same files.
ln -s usr/lib "$root/lib"
ln -s usr/lib64 "$root/lib64"
cp "$bin" "$root/usr/local/bin/keycard"
cp deploy/image/passwd deploy/image/group "$root/etc/"
# Copies the shared libraries $1 loads (and the loader) into the root, once each.
copy_libs() {
  local lib
  for lib in $(ldd "$1" | awk '/=>/ {print $3} !/=>/ && $1 ~ /^\// {print $1}'); do
    if [ ! -e "$root$lib" ]; then cp -L --parents "$lib" "$root"; fi
  done
}
for multi in xtables-nft-multi xtables-legacy-multi; do
  path=$(command -v "$multi" || true)
  [ -z "$path" ] && continue
  cp -L "$path" "$root/usr/sbin/"
  copy_libs "$path"
  flavour=${multi#xtables-}; flavour=${flavour%-multi}
  for fam in iptables ip6tables; do
    for suffix in "" -save -restore; do
      ln -sf "$multi" "$root/usr/sbin/$fam-$flavour$suffix"
    done
  done
done
# Plain names follow this machine's default flavour.
default=$(readlink -f "$(command -v iptables)")
for fam in iptables ip6tables; do
  for suffix in "" -save -restore; do
    ln -sf "$(basename "$default")" "$root/usr/sbin/$fam$suffix"
  done
done
xt=$(dirname "$(ldd "$default" | awk '/libxtables/ {print $3}')")/xtables
if [ -d "$xt" ]; then
  mkdir -p "$root$xt"
  cp -L "$xt"/*.so "$root$xt/"
  for so in "$xt"/*.so; do copy_libs "$so"; done
fi
cp deploy/image/init.Dockerfile "$ctx/Dockerfile"
docker build -q -t "keycard-init:$tag" "$ctx" >/dev/null
echo "built keycard-init:$tag ($(docker image inspect -f '{{.Size}}' "keycard-init:$tag") bytes)"
