#!/usr/bin/env bash
# Build the base images of the FAIR stack from a Debian mirror, for machines that cannot pull from an
# image registry (air-gapped sites, internal mirrors only). Run --help for the details.
set -euo pipefail

usage() {
  cat <<'USAGE'
usage: deploy/offline/build-base-images.sh [--mirror URL] [--suite SUITE] [--keyring FILE] [--ca-dir DIR] [--force]

Makes these local images from Debian packages (no registry is contacted):

  fair-offline/debian:bookworm        debootstrap --variant=minbase, imported with `docker import`
  fair-offline/python:3.11-bookworm   + python3, venv, pip  (the Dockerfile's PYTHON_IMAGE)
  fair-offline/redis:bookworm         + redis-server        (docker-compose.offline.yml's redis)
  fair-offline/prometheus:bookworm    + prometheus          (docker-compose.offline.yml's prometheus)

Then build the stack with the offline override (see docs/operations.md, "Building without a registry"):

  docker compose -f docker-compose.yml -f docker-compose.offline.yml up --build

Options:
  --mirror URL   Debian mirror for debootstrap and for apt inside the images
                 (default: $DEBIAN_MIRROR or https://deb.debian.org/debian)
  --suite NAME   Debian suite (default: bookworm; its python3 is the 3.11 the project needs)
  --keyring FILE the OpenPGP keys the mirror's Release file must be signed with: debootstrap
                 refuses the mirror otherwise (--force-check-gpg), and apt inside the images
                 checks with the same keys (default: /usr/share/keyrings/debian-archive-keyring.gpg,
                 Debian's own archive keys from the debian-archive-keyring package; give your
                 own for an internal mirror that re-signs, e.g. aptly or reprepro)
  --ca-dir DIR   extra CA certificates (*.crt) to trust inside the images, e.g. the CA of a
                 TLS-intercepting proxy or of an internal PyPI mirror
                 (default: /usr/local/share/ca-certificates, the host's own extra CAs)
  --force        rebuild images that already exist (default: keep them)

Needs root (debootstrap), the debootstrap, gpgv and debian-archive-keyring packages and a running
Docker engine. The three derived images are built with `docker build --network host`, so apt inside
them reaches the same mirror the host does.

Trust: the Release file's signature is what makes the packages trustworthy (it lists the hash of
every package index, and the indexes the hash of every package), so an http mirror is safe to use
and https only adds privacy; an unsigned or wrongly signed mirror stops the build.
USAGE
}

MIRROR=${DEBIAN_MIRROR:-https://deb.debian.org/debian}
SUITE=bookworm
DEBIAN_KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
KEYRING=$DEBIAN_KEYRING
CA_DIR=/usr/local/share/ca-certificates
FORCE=0
while [ $# -gt 0 ]; do
  case "$1" in
    --mirror) MIRROR=$2; shift 2 ;;
    --suite) SUITE=$2; shift 2 ;;
    --keyring) KEYRING=$2; shift 2 ;;
    --ca-dir) CA_DIR=$2; shift 2 ;;
    --force) FORCE=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "build-base-images.sh: unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
done

HERE=$(cd "$(dirname "$0")" && pwd)
DEBIAN_IMAGE=fair-offline/debian:$SUITE

die() { echo "build-base-images.sh: $*" >&2; exit 1; }
have_image() { docker image inspect "$1" >/dev/null 2>&1; }

[ "$(id -u)" = 0 ] || die "debootstrap needs root; run it with sudo"
command -v debootstrap >/dev/null || die "debootstrap is missing: apt-get install debootstrap"
command -v gpgv >/dev/null || die "gpgv is missing (debootstrap checks the mirror's signature with it): apt-get install gpgv"
[ -s "$KEYRING" ] || die "no keyring at $KEYRING: apt-get install debian-archive-keyring (or --keyring FILE)"
docker info >/dev/null 2>&1 || die "no Docker engine answers (docker info failed); start dockerd first"

# ---- 1. the Debian root filesystem, imported as an image --------------------------------------------
if [ "$FORCE" = 1 ] || ! have_image "$DEBIAN_IMAGE"; then
  started=$(date +%s)
  rootfs=$(mktemp -d /tmp/fair-rootfs.XXXXXX)
  trap 'rm -rf "$rootfs"' EXIT
  echo "build-base-images.sh: debootstrap $SUITE from $MIRROR, Release signature checked against $KEYRING (a few minutes)"
  # --force-check-gpg: abort, instead of going on unchecked, when the signature cannot be verified
  debootstrap --variant=minbase --include=ca-certificates --keyring="$KEYRING" --force-check-gpg \
    "$SUITE" "$rootfs" "$MIRROR" >/dev/null
  # apt inside the images checks signatures too (apt depends on debian-archive-keyring, so Debian's
  # keys are in the root filesystem); a mirror signed with other keys needs those keys there as well.
  if [ "$KEYRING" != "$DEBIAN_KEYRING" ]; then
    ext=gpg; case "$KEYRING" in *.asc) ext=asc ;; esac  # apt reads binary .gpg and armored .asc
    install -m 644 "$KEYRING" "$rootfs/etc/apt/trusted.gpg.d/fair-mirror.$ext"
  fi
  # apt inside the images: the release, its updates and security fixes. The security archive sits
  # next to the main one on deb.debian.org-style mirrors; a mirror without it fails the apt-get
  # update in the next step, which names the URL.
  security=${MIRROR%/debian}/debian-security
  cat > "$rootfs/etc/apt/sources.list" <<SOURCES
deb $MIRROR $SUITE main
deb $MIRROR $SUITE-updates main
deb $security $SUITE-security main
SOURCES
  # Packages must not try to start their daemons while an image is built (there is no init system):
  # invoke-rc.d asks this script and skips the start on 101. Debian's own Docker images do the same.
  printf '#!/bin/sh\nexit 101\n' > "$rootfs/usr/sbin/policy-rc.d"
  chmod 755 "$rootfs/usr/sbin/policy-rc.d"
  # Small images: no recommends, no documentation, no apt lists left behind.
  printf 'APT::Install-Recommends "false";\nAPT::Install-Suggests "false";\n' \
    > "$rootfs/etc/apt/apt.conf.d/90fair-no-recommends"
  printf 'path-exclude /usr/share/doc/*\npath-exclude /usr/share/man/*\npath-exclude /usr/share/locale/*\n' \
    > "$rootfs/etc/dpkg/dpkg.cfg.d/90fair-nodoc"
  # The site's CAs: pip and apt inside the images must trust what the host trusts (a proxy that
  # intercepts TLS, an internal mirror).
  if [ -d "$CA_DIR" ] && ls "$CA_DIR"/*.crt >/dev/null 2>&1; then
    cp "$CA_DIR"/*.crt "$rootfs/usr/local/share/ca-certificates/"
    chroot "$rootfs" update-ca-certificates >/dev/null
    echo "build-base-images.sh: trusting $(ls "$CA_DIR"/*.crt | wc -l) extra CA certificate(s) from $CA_DIR"
  fi
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  tar -C "$rootfs" --numeric-owner -c . \
    | docker import --change 'CMD ["/bin/bash"]' --change 'ENV LANG=C.UTF-8' - "$DEBIAN_IMAGE" >/dev/null
  rm -rf "$rootfs"
  trap - EXIT
  echo "build-base-images.sh: $DEBIAN_IMAGE built in $(( $(date +%s) - started )) s"
else
  echo "build-base-images.sh: $DEBIAN_IMAGE exists, kept (--force rebuilds)"
fi

# ---- 2. python, redis, prometheus on top of it ------------------------------------------------------
build() {  # build TAG DOCKERFILE
  local tag=$1 file=$2 started
  if [ "$FORCE" = 0 ] && have_image "$tag"; then
    echo "build-base-images.sh: $tag exists, kept (--force rebuilds)"
    return
  fi
  started=$(date +%s)
  # One stage each, so the legacy builder will do: it needs no buildx plugin, which a docker CLI
  # from docker.com packages (not Debian's docker.io) lacks unless installed separately.
  local log
  log=$(mktemp /tmp/fair-base-build.XXXXXX.log)
  if ! DOCKER_BUILDKIT=0 docker build --network host --build-arg "DEBIAN_IMAGE=$DEBIAN_IMAGE" \
    -t "$tag" -f "$HERE/$file" "$HERE" >"$log" 2>&1; then
    tail -n 30 "$log" >&2
    die "building $tag failed (full log: $log)"
  fi
  rm -f "$log"
  echo "build-base-images.sh: $tag built in $(( $(date +%s) - started )) s"
}
build "fair-offline/python:3.11-$SUITE" python.Dockerfile
build "fair-offline/redis:$SUITE" redis.Dockerfile
build "fair-offline/prometheus:$SUITE" prometheus.Dockerfile
