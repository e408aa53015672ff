# Prometheus from Debian (2.42 on bookworm), in the role of prom/prometheus in docker-compose.yml:
# the prometheus binary is the entry point, so the compose file's `command:` are its flags, and
# /prometheus (the TSDB volume) belongs to the user it runs as.
ARG DEBIAN_IMAGE=fair-offline/debian:bookworm
FROM ${DEBIAN_IMAGE}
RUN apt-get update \
    && apt-get install -y prometheus \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /prometheus \
    && chown prometheus:prometheus /prometheus
WORKDIR /prometheus
USER prometheus
EXPOSE 9090
ENTRYPOINT ["/usr/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
