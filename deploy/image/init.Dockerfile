# keycard-init: the `keycard iptables` init step, with iptables. The base is empty; build.sh fills
# the context with the static keycard binary and this machine's iptables (nft and legacy
# multi-binaries, the libraries they load and their extensions), so nothing is pulled.
FROM scratch
COPY rootfs/ /
USER 0:0
ENTRYPOINT ["/usr/local/bin/keycard", "iptables"]
