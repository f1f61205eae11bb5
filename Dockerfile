# keycard: one static binary on an empty base, running as uid 1337 (the uid `keycard iptables`
# exempts from capture). Nothing is pulled: build the binary first, then the image:
#
#   bash deploy/image/build.sh          # both images: keycard:dev and keycard-init:dev
#
# which runs `cargo build --release --target x86_64-unknown-linux-musl`, strips the binary into
# target/image/keycard and then runs `docker build -t keycard:dev .` with this file.
FROM scratch
COPY deploy/image/passwd deploy/image/group /etc/
# State (a CA's files, tokens) lives here; a named volume mounted here starts out owned by 1337.
COPY --chown=1337:1337 deploy/image/state/ /var/lib/keycard/
COPY target/image/keycard /usr/local/bin/keycard
USER 1337:1337
ENTRYPOINT ["/usr/local/bin/keycard"]
CMD ["--help"]
# A sidecar's readiness (certificate and policy loaded); other roles override or disable it.
HEALTHCHECK --interval=2s --timeout=3s --start-period=2s --retries=3 CMD ["/usr/local/bin/keycard", "healthcheck"]
