#!/usr/bin/env bash
# Build the stand-in env image: a Debian rootfs with Python and the pip packages that a rendered
# environment.yml lists, imported with `docker import`.
#
# Why: where no container registry and no conda channel can be reached (this project's CI), the
# conda env stage of the generated Dockerfile (FROM continuumio/miniconda3, conda env create)
# cannot be built. This image replaces that one stage (ENV_IMAGE=<tag>); every other layer of the
# Dockerfile is built and run for real on top of it. Differences from the real env: Debian's
# Python instead of conda's, and torch wheels from this machine's pip configuration instead of
# PyTorch's CPU index. The generated repo's own GitHub workflow builds the real image.
#
# usage: standin-image.sh ENVIRONMENT_YML [TAG]     (needs root: debootstrap and chroot)
set -o errexit -o nounset -o pipefail

env_file="${1:?usage: standin-image.sh ENVIRONMENT_YML [TAG]}"
tag="${2:-ddp-template-env:standin}"
python="${PYTHON:-python3}"

# Debian's suite and mirror come from the host's own apt sources, never a hard-coded host.
suite="$(awk -F= '$1 == "VERSION_CODENAME" {print $2}' /etc/os-release)"
mirror="$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)"
if [ -z "$mirror" ]; then
  mirror="$(awk '$1 == "deb" {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)"
fi
[ -n "$mirror" ] || { echo "ERROR: no Debian mirror found in the host's apt sources" >&2; exit 1; }

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# The pip requirements of environment.yml, without pip options such as --extra-index-url.
"$python" - "$env_file" >"$work/requirements.txt" <<'PY'
import sys
import yaml

env = yaml.safe_load(open(sys.argv[1]))
for dep in env["dependencies"]:
    if isinstance(dep, dict):
        for line in dep.get("pip", []):
            if not line.startswith("-"):
                print(line)
    elif dep.startswith("python="):
        print(f"# {dep}")
PY
wanted_python="$(sed -n 's/^# python=//p' "$work/requirements.txt")"

# Rebuild only when an input changes: the requirements, the suite and this script.
hash="$(cat "$work/requirements.txt" "$0" <(echo "$suite") | sha256sum | cut -c1-16)"
if [ "$(docker image inspect --format '{{ index .Config.Labels "standin.hash" }}' "$tag" 2>/dev/null)" = "$hash" ]; then
  echo "stand-in env image $tag is up to date ($hash)"
  exit 0
fi

rootfs="$work/rootfs"
# A clean environment inside the chroot: the host's PIP_* settings name host paths.
in_rootfs() { env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 chroot "$rootfs" "$@"; }
echo "debootstrap $suite from $mirror"
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates,iproute2,procps \
  "$suite" "$rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 \
  || { tail -n 20 "$work/debootstrap.log" >&2; exit 1; }
have_python="$(in_rootfs python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
if [ -n "$wanted_python" ] && [ "$wanted_python" != "$have_python" ]; then
  echo "ERROR: $env_file asks for Python $wanted_python; Debian $suite has $have_python" >&2
  exit 1
fi
# The host's CA bundle, so that TLS works inside the image as it does on the host (a proxy that
# re-signs traffic has its CA there).
cp /etc/ssl/certs/ca-certificates.crt "$rootfs/usr/local/share/ca-certificates/host-bundle.crt"
in_rootfs update-ca-certificates >/dev/null

# Wheels are fetched on the host, with the host's pip configuration, and installed offline.
"$python" -m pip download --quiet --dest "$rootfs/tmp/wheels" --requirement "$work/requirements.txt"
cp "$work/requirements.txt" "$rootfs/tmp/requirements.txt"
in_rootfs python3 -m venv /opt/env
in_rootfs /opt/env/bin/pip install --quiet --no-index --find-links /tmp/wheels \
  --requirement /tmp/requirements.txt
rm -rf "$rootfs/tmp/wheels" "$rootfs/tmp/requirements.txt" "$rootfs/var/cache/apt/archives/"*.deb

tar --numeric-owner -C "$rootfs" -c . | docker import \
  --change 'ENV PATH=/opt/env/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change "LABEL standin.hash=$hash" \
  --change 'CMD ["python3"]' \
  - "$tag" >/dev/null
echo "built stand-in env image $tag ($hash)"
