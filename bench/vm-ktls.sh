#!/usr/bin/env bash
# keycard-l4 and keycard-l7 without and with kernel TLS, in one virtual machine that has the kernel's `tls`
# module (Debian's cloud kernel under QEMU, as tests/vm/ktls.sh boots it): the harness runs once
# before the module is loaded (the probe fails: keycard's record layer takes every mesh connection;
# rustls did before it existed) and once after (every mesh connection goes to the kernel), same
# binary, same VM. Software emulation makes
# every timing meaningless, so only memory is read from it: resident memory per idle connection
# and peak RSS. The machines that build keycard run kernels without the module, hence the VM.
#
# Usage: bash bench/vm-ktls.sh [IDLE]   (default 2000 idle connections; as root, like bench/run)
set -euo pipefail
cd "$(dirname "$0")/.."
. tests/vm/lib.sh
idle=${1:-2000}
work="$PWD/target/vm"
mkdir -p "$work"

vm_tools
vm_kernel "$work"
command -v musl-gcc >/dev/null || { apt-get update -qq && apt-get install -y -qq musl-tools >/dev/null; }
rustup target add x86_64-unknown-linux-musl >/dev/null 2>&1 || true
cargo build --release --target x86_64-unknown-linux-musl --bin keycard
cargo build --release -p keycard-bench

root="$work/bench"
vm_root "$root"
cp target/x86_64-unknown-linux-musl/release/keycard "$root/t/keycard"
cp target/release/keycard-bench "$root/t/keycard-bench"
vm_libs "$root" target/release/keycard-bench
run="/t/keycard-bench run --keycard /t/keycard --systems keycard-l4,keycard-l7 --repeats 1 --rates 1000 --paced-s 1 --closed-s 1 --bulk-bytes 4194304 --idle $idle"
cat > "$root/init" <<EOF
$VM_INIT_HEAD
ulimit -n 65536
echo "ktls-vm: keycard's record layer (no tls module yet)"
$run --out /tmp/records >/tmp/records.log 2>&1
echo "ktls-vm: record layer run exit \$?"
vm_insmod
echo "ktls-vm: kernel TLS, ulps: \$(cat /proc/sys/net/ipv4/tcp_available_ulp)"
$run --out /tmp/kernel >/tmp/kernel.log 2>&1
echo "ktls-vm: kernel run exit \$?"
for r in records kernel; do
  echo "ktls-vm: ==== \$r"
  grep -E '^\| (system|keycard-l4|keycard-l7) ' /tmp/\$r/RESULTS.md | sed 's/^/ktls-vm: /'
  grep -i error /tmp/\$r.log | head -5 | sed 's/^/ktls-vm: /'
done
poweroff -f
EOF
log="$work/bench.log"
vm_boot "$root" 4096 "$log" 1500
grep -E '^ktls-vm' "$log" || { vm_say "no output (console in $log)"; exit 1; }
