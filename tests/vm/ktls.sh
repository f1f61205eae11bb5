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
. tests/vm/lib.sh
work="$PWD/target/vm"
mkdir -p "$work"

vm_tools
vm_kernel "$work"

# The test binaries, as `cargo test` builds them.
executables() {
  cargo test "$@" --no-run --message-format=json 2>/dev/null | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        print(m["executable"])'
}
vm_say "building the test binaries"
proxy_tests=$(executables -p keycard-proxy --lib)
sidecar_tests=$(executables -p keycard --test sidecar_ktls)
[ -n "$proxy_tests" ] && [ -n "$sidecar_tests" ] || { vm_say "no test binaries"; exit 1; }

root="$work/tests"
vm_root "$root"
strip -o "$root/t/proxy-tests" "$proxy_tests"
strip -o "$root/t/sidecar-ktls" "$sidecar_tests"
vm_libs "$root" "$proxy_tests" "$sidecar_tests"
cat > "$root/init" <<EOF
$VM_INIT_HEAD
vm_insmod
echo "ktls-vm: kernel \$(uname -r), ulps: \$(cat /proc/sys/net/ipv4/tcp_available_ulp)"
export KEYCARD_REQUIRE_KTLS=1 RUST_BACKTRACE=1
/t/proxy-tests --test-threads=1 ktls:: forward::
echo "ktls-vm: proxy-tests exit \$?"
/t/sidecar-ktls --test-threads=1
echo "ktls-vm: sidecar-ktls exit \$?"
poweroff -f
EOF
log="$work/tests.log"
vm_boot "$root" 2048 "$log" 1200
grep -E '^(ktls-vm|test |test result|SKIPPED|NOTE|thread|---- )|panicked|left:|right:' "$log" || true

passed=$(grep -oE '^test result: .* ([0-9]+) passed' "$log" | grep -oE '[0-9]+ passed' | awk '{s+=$1} END {print s+0}')
failed=$(grep -oE '; [0-9]+ failed' "$log" | grep -oE '[0-9]+' | awk '{s+=$1} END {print s+0}')
ok=true
grep -q 'ulps:.*\btls\b' "$log" || { vm_say "the VM's kernel did not offer tls (console in $log)"; ok=false; }
grep -q '^ktls-vm: proxy-tests exit 0$' "$log" || ok=false
grep -q '^ktls-vm: sidecar-ktls exit 0$' "$log" || ok=false
vm_say "${passed} passed, ${failed} failed under $(basename "$VM_VMLINUZ")"
$ok
