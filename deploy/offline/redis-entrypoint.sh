#!/bin/sh
# Debian's redis-server starts in protected mode when it has no config file and no password: it then
# refuses every client that is not on loopback, i.e. the other containers. The official redis image
# turns protected mode off at compile time; this does the same on the command line. The container's
# port is published to no one by docker-compose.yml, so only the stack's own network reaches it.
if [ "${1:-}" = redis-server ]; then
  shift
  exec redis-server --protected-mode no "$@"
fi
exec "$@"
