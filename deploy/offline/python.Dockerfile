# Python 3.11 from Debian, in the role of python:3.11-slim-bookworm (the Dockerfile's PYTHON_IMAGE):
# `python`, `pip` and `python -m venv` work, and pip trusts the system CA bundle (with the site's CAs
# that build-base-images.sh added) instead of the certifi bundle it ships with.
ARG DEBIAN_IMAGE=fair-offline/debian:bookworm
FROM ${DEBIAN_IMAGE}
RUN apt-get update \
    && apt-get install -y python3 python3-venv python3-pip python-is-python3 \
    && rm -rf /var/lib/apt/lists/* \
    && printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' > /etc/pip.conf \
    && python -c "import sys; assert sys.version_info >= (3, 11), sys.version"
CMD ["python"]
