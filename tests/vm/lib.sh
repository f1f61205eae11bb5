# Shared by tests/vm/ktls.sh and bench/vm-ktls.sh: a kernel that has the `tls` module (Debian's
# cloud kernel, unpacked, not installed), its kernel-TLS modules in load order, and a QEMU boot
# of an initramfs made from a folder (software emulation: no KVM needed). Source it from the
# repository root; it defines functions and sets nothing else.

vm_say() { printf 'ktls-vm: %s\n' "$*"; }

# Installs QEMU, a static busybox and the tools the image needs (as root).
vm_tools() {
  local need=()
  command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
  { [ -x /bin/busybox ] && /bin/busybox --list | grep -x insmod >/dev/null; } || need+=(busybox-static)
  command -v python3 >/dev/null || need+=(python3)
  command -v strip >/dev/null || need+=(binutils)
  if [ ${#need[@]} -gt 0 ]; then
    vm_say "installing ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  fi
}

# Sets VM_VMLINUZ and VM_MODULES (the .ko files kernel TLS and its AEADs need, each after what
# its `depends=` names), downloading the package into $1 once.
vm_kernel() {
  local work=$1 pkg kdir moddir m
  pkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-/ {print $2; exit}' || true)
  if [ -z "$pkg" ]; then
    apt-get update -qq
    pkg=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-/ {print $2; exit}')
  fi
  kdir="$work/kernel/$pkg"
  if [ ! -d "$kdir/boot" ]; then
    vm_say "downloading $pkg"
    rm -rf "$work/deb" && mkdir -p "$work/deb"
    # Lists older than the archive name a package it no longer has: update once and ask again.
    (cd "$work/deb" && apt-get download -qq "$pkg" 2>/dev/null) || {
      apt-get update -qq
      pkg=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-/ {print $2; exit}')
      kdir="$work/kernel/$pkg"
      (cd "$work/deb" && apt-get download -qq "$pkg" 2>/dev/null)
    }
    mkdir -p "$kdir"
    dpkg-deb -x "$work"/deb/*.deb "$kdir"
    rm -rf "$work/deb"
  fi
  VM_VMLINUZ=$(ls "$kdir"/boot/vmlinuz-*)
  moddir=$(ls -d "$kdir"/lib/modules/*/kernel)
  VM_MODULES=()
  _vm_add() {
    local file dep
    file=$(find "$moddir" -name "$1.ko" -o -name "${1//-/_}.ko" -o -name "${1//_/-}.ko" | head -1)
    [ -n "$file" ] || { vm_say "module $1 not in $pkg"; return 1; }
    for dep in $(strings "$file" | sed -n 's/^depends=//p' | tr ',' ' '); do _vm_add "$dep" || return 1; done
    case " ${VM_MODULES[*]-} " in *" $file "*) ;; *) VM_MODULES+=("$file") ;; esac
  }
  # gcm(aes) and rfc7539(chacha20,poly1305), the AEADs of the TLS 1.3 suites, then tls.
  for m in gf128mul ghash-generic ctr gcm libchacha chacha_generic libpoly1305 poly1305_generic chacha20poly1305 tls; do
    _vm_add "$m" || return 1
  done
  # The x86 implementations a real host would pick (AES-NI, PCLMULQDQ, SIMD ChaCha; QEMU's
  # `-cpu max` offers the instructions); where one is missing the generic one serves.
  for m in aesni-intel ghash-clmulni-intel chacha-x86_64 poly1305-x86_64; do
    _vm_add "$m" 2>/dev/null || vm_say "no $m: the generic implementation serves"
  done
}

# A fresh initramfs folder $1 with busybox, the modules under /modules (in load order) and /t.
vm_root() {
  local root=$1 i=0 f
  rm -rf "$root" && mkdir -p "$root"/{bin,proc,sys,dev,tmp,modules,t}
  cp /bin/busybox "$root/bin/busybox"
  for f in "${VM_MODULES[@]}"; do
    i=$((i + 1))
    cp "$f" "$root/modules/$(printf '%02d' $i)-$(basename "$f")"
  done
}

# Copies the shared libraries of the given binaries into $1 at the paths the loader looks in.
vm_libs() {
  local root=$1 lib
  shift
  for lib in $(ldd "$@" 2>/dev/null | grep -oE '/[^ ]+\.so[^ ]*' | sort -u); do
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
  done
}

# The first lines of every init script: busybox, the kernel's file systems, loopback up.
VM_INIT_HEAD='#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin TMPDIR=/tmp HOME=/tmp
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
ip link set lo up
vm_insmod() { for m in /modules/*.ko; do insmod "$m" || echo "ktls-vm: insmod $m failed"; done; }'

# Packs folder $1 (whose /init it runs) and boots it with $2 MiB, the console copied to $3 with
# carriage returns dropped; gives up after $4 seconds.
vm_boot() {
  local root=$1 mem=$2 log=$3 limit=$4
  chmod +x "$root/init"
  (cd "$root" && find . | /bin/busybox cpio -o -H newc 2>/dev/null) | gzip -1 > "$root.gz"
  vm_say "booting $(basename "$VM_VMLINUZ") under QEMU (software emulation)"
  timeout "$limit" qemu-system-x86_64 -accel tcg -cpu max -smp 2 -m "$mem" -nographic -no-reboot -net none \
    -kernel "$VM_VMLINUZ" -initrd "$root.gz" -append "console=ttyS0 quiet panic=-1" \
    </dev/null 2>&1 | tr -d '\r' > "$log" || true
}
