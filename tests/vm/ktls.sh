#!/usr/bin/env bash
# Runs keycard's kernel-TLS tests under a kernel that has the `tls` module: Debian's cloud kernel,
# booted in a QEMU virtual machine (software emulation, so no KVM is needed) with an initramfs
# made here: busybox, the kernel's tls and AEAD modules, and the test binaries `cargo test` builds
# (proxy's `ktls::` and `forward::` unit tests, tests/sidecar_ktls.rs), run with
# KEYCARD_REQUIRE_KTLS=1 so that a fallback to rustls fails them. The machines that build keycard
# run kernels without the module, where those tests check the fallback only.
#
# Usage: bash tests/vm/ktls.sh        (as root: installs qemu-system-x86 and busybox-static, and
#                                      downloads the kernel package into target/vm once)
set -euo pipefail
cd "$(dirname "$0")/../.."
work="$PWD/target/vm"
mkdir -p "$work"

say() { printf 'ktls-vm: %s\n' "$*"; }

need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
{ [ -x /bin/busybox ] && /bin/busybox --list | grep -x insmod >/dev/null; } || need+=(busybox-static)
command -v python3 >/dev/null || need+=(python3)
command -v strip >/dev/null || need+=(binutils)
if [ ${#need[@]} -gt 0 ]; then
  say "installing ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# The kernel: the package linux-image-cloud-amd64 points at, unpacked (not installed).
pkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-/ {print $2; exit}' || true)
if [ -z "$pkg" ]; then
  apt-get update -qq
  pkg=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-/ {print $2; exit}')
fi
kdir="$work/kernel/$pkg"
if [ ! -d "$kdir/boot" ]; then
  say "downloading $pkg"
  rm -rf "$work/deb" && mkdir -p "$work/deb"
  (cd "$work/deb" && apt-get download -qq "$pkg" 2>/dev/null)
  mkdir -p "$kdir"
  dpkg-deb -x "$work"/deb/*.deb "$kdir"
  rm -rf "$work/deb"
fi
vmlinuz=$(ls "$kdir"/boot/vmlinuz-*)
moddir=$(ls -d "$kdir"/lib/modules/*/kernel)

# Modules in load order (each after what its `depends=` names): kernel TLS and the AEADs its
# TLS 1.3 suites instantiate (gcm(aes), rfc7539(chacha20,poly1305)).
find_module() { find "$moddir" -name "$1.ko" -o -name "${1//-/_}.ko" -o -name "${1//_/-}.ko" | head -1; }
order=()
add_module() {
  local file dep
  file=$(find_module "$1")
  [ -n "$file" ] || { say "module $1 not in $pkg"; exit 1; }
  for dep in $(strings "$file" | sed -n 's/^depends=//p' | tr ',' ' '); do add_module "$dep"; done
  case " ${order[*]-} " in *" $file "*) ;; *) order+=("$file") ;; esac
}
for m in gf128mul ghash-generic ctr gcm libchacha chacha_generic libpoly1305 poly1305_generic chacha20poly1305 tls; do
  add_module "$m"
done

# The test binaries, as `cargo test` builds them.
executables() {
  cargo test "$@" --no-run --message-format=json 2>/dev/null | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        print(m["executable"])'
}
say "building the test binaries"
proxy_tests=$(executables -p keycard-proxy --lib)
sidecar_tests=$(executables -p keycard --test sidecar_ktls)
[ -n "$proxy_tests" ] && [ -n "$sidecar_tests" ] || { say "no test binaries"; exit 1; }

root="$work/initramfs"
rm -rf "$root" && mkdir -p "$root"/{bin,proc,sys,dev,tmp,modules,t}
cp /bin/busybox "$root/bin/busybox"
i=0
for f in "${order[@]}"; do
  i=$((i + 1))
  cp "$f" "$root/modules/$(printf '%02d' $i)-$(basename "$f")"
done
strip -o "$root/t/proxy-tests" "$proxy_tests"
strip -o "$root/t/sidecar-ktls" "$sidecar_tests"
# Their shared libraries, at the paths the loader looks in.
for lib in $(ldd "$proxy_tests" "$sidecar_tests" | grep -oE '/[^ ]+\.so[^ ]*' | sort -u); do
  mkdir -p "$root$(dirname "$lib")"
  cp -L "$lib" "$root$lib"
done

cat > "$root/init" <<'EOF'
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
ip link set lo up
for m in /modules/*.ko; do insmod "$m" || echo "ktls-vm: insmod $m failed"; done
echo "ktls-vm: kernel $(uname -r), ulps: $(cat /proc/sys/net/ipv4/tcp_available_ulp)"
export KEYCARD_REQUIRE_KTLS=1 TMPDIR=/tmp RUST_BACKTRACE=1 HOME=/tmp
/t/proxy-tests --test-threads=1 ktls:: forward::
echo "ktls-vm: proxy-tests exit $?"
/t/sidecar-ktls --test-threads=1
echo "ktls-vm: sidecar-ktls exit $?"
poweroff -f
EOF
chmod +x "$root/init"
(cd "$root" && find . | /bin/busybox cpio -o -H newc 2>/dev/null) | gzip -1 > "$work/initramfs.gz"
say "booting $(basename "$vmlinuz") under QEMU (software emulation; a few minutes)"
log="$work/vm.log"
timeout 1200 qemu-system-x86_64 -accel tcg -cpu max -smp 2 -m 2048 -nographic -no-reboot -net none \
  -kernel "$vmlinuz" -initrd "$work/initramfs.gz" -append "console=ttyS0 quiet panic=-1" \
  </dev/null 2>&1 | tr -d '\r' | tee "$log" | grep -E '^(ktls-vm|test |test result|SKIPPED|NOTE|thread|---- )' || true

passed=$(grep -oE '^test result: .* ([0-9]+) passed' "$log" | grep -oE '[0-9]+ passed' | awk '{s+=$1} END {print s+0}')
failed=$(grep -oE '; [0-9]+ failed' "$log" | grep -oE '[0-9]+' | awk '{s+=$1} END {print s+0}')
ok=true
grep -q 'ulps:.*\btls\b' "$log" || { say "the VM's kernel did not offer tls"; ok=false; }
grep -q '^ktls-vm: proxy-tests exit 0$' "$log" || ok=false
grep -q '^ktls-vm: sidecar-ktls exit 0$' "$log" || ok=false
say "${passed} passed, ${failed} failed under $(basename "$vmlinuz")"
$ok
