# Redis from Debian, in the role of redis:7.4-alpine in docker-compose.yml. The command line is the
# compose file's (`redis-server --appendonly yes ...`); data goes to /data (the redis-data volume).
ARG DEBIAN_IMAGE=fair-offline/debian:bookworm
FROM ${DEBIAN_IMAGE}
RUN apt-get update \
    && apt-get install -y redis-server \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /data \
    && chown redis:redis /data
COPY redis-entrypoint.sh /usr/local/bin/redis-entrypoint.sh
WORKDIR /data
USER redis
EXPOSE 6379
ENTRYPOINT ["/usr/local/bin/redis-entrypoint.sh"]
CMD ["redis-server"]
