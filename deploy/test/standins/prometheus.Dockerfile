# Stand-in for prom/prometheus where no image registry is reachable: Debian
# bookworm's prometheus package (2.x, as the compose file's configuration
# expects), with the official image's entrypoint and wget for the health check.
FROM local/debian:bookworm
RUN apt-get update -qq \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus wget >/dev/null \
 && rm -rf /var/lib/apt/lists/*
# Debian's default storage path is under /var/lib/prometheus, which the package gives to its user.
USER prometheus
WORKDIR /var/lib/prometheus
EXPOSE 9090
ENTRYPOINT ["/usr/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml"]
