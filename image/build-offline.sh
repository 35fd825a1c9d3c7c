#!/usr/bin/env bash
# Build the natgwd container image without any container registry (no base image pull):
#
#   debootstrap --variant=minbase bookworm  ->  rootfs with Debian's python3, python3-nftables,
#   nftables, iproute2, conntrack, keepalived, conntrackd (+ bookworm-updates and -security)
#   natgwd wheel + its PyPI dependencies    ->  venv /opt/natgwd (--system-site-packages, so
#                                              Debian's nftables binding is importable)
#   strip docs/man/locales/apt lists/caches ->  buildah from scratch + commit (docker format,
#                                              so the HEALTHCHECK is kept)
#
# The result is the image image/Containerfile builds (same paths, entrypoint, env, labels,
# healthcheck), tagged localhost/natgwd:dev by default.
#
# Usage (as root, from anywhere in a clone):  image/build-offline.sh
# Environment:
#   NATGWD_IMAGE        image name            (default localhost/natgwd:dev)
#   DEBIAN_MIRROR       Debian mirror         (default http://deb.debian.org/debian)
#   DEBIAN_SECURITY     security mirror       (default http://deb.debian.org/debian-security)
#   NATGWD_IMAGE_CACHE  cache directory       (default /var/cache/natgwd-image): downloaded
#                       .debs and the finished base rootfs, reused while younger than
#                       NATGWD_BASE_MAX_AGE_HOURS (default 24; 0 = always rebuild the base)
#   PYTHON              a Python 3 with pip to build/download wheels (default: the clone's
#                       .venv, else python3; a throw-away venv is made if neither has pip)
#   NATGWD_NO_APT=1     never apt-get install missing build tools (fail instead)
#
# Needs: root, debootstrap, buildah (apt-get installs them when missing), network access to
# a Debian mirror and to PyPI (or a pip cache holding the wheels).
set -euo pipefail

IMAGE=${NATGWD_IMAGE:-localhost/natgwd:dev}
SUITE=bookworm
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${DEBIAN_SECURITY:-http://deb.debian.org/debian-security}
CACHE=${NATGWD_IMAGE_CACHE:-/var/cache/natgwd-image}
BASE_MAX_AGE_HOURS=${NATGWD_BASE_MAX_AGE_HOURS:-24}
# The rootfs's python3 must be the one the wheels are chosen for.
PY_VERSION=3.11
# procps: sysctl, which kube-ovn-controller's postStart hook runs (`sysctl -w net.ipv4.ip_forward=1`).
# keepalived and conntrackd: the HA pair's children (natgwd runs them with an `ha` section).
PACKAGES=python3,python3-nftables,libnftables1,nftables,iproute2,conntrack,procps,keepalived,conntrackd
VENV=/opt/natgwd
# Bump when the base rootfs recipe changes (invalidates cached bases).
BASE_RECIPE=3

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
started=$SECONDS

log() { printf '[build-offline %3ss] %s\n' "$((SECONDS - started))" "$*" >&2; }
die() { log "error: $*"; exit 1; }

[[ $(id -u) -eq 0 ]] || die "must run as root (debootstrap, chroot, buildah)"

# --- tools ---------------------------------------------------------------------------------

need_apt=()
command -v debootstrap >/dev/null || need_apt+=(debootstrap)
command -v buildah >/dev/null || need_apt+=(buildah)
if ((${#need_apt[@]})); then
    [[ ${NATGWD_NO_APT:-0} != 1 ]] || die "missing ${need_apt[*]} (NATGWD_NO_APT=1)"
    log "installing ${need_apt[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

# --- clean-up, also on failure ---------------------------------------------------------------

mkdir -p "$CACHE/debs"
work=$(mktemp -d /var/tmp/natgwd-image.XXXXXX)
rootfs=$work/rootfs
ctr=""
unmount_rootfs() {
    local target
    for target in proc dev/pts dev; do
        if mountpoint -q "$rootfs/$target" 2>/dev/null; then
            umount -l "$rootfs/$target" || true
        fi
    done
}
cleanup() {
    local code=$?
    unmount_rootfs
    if [[ -n $ctr ]]; then
        buildah umount "$ctr" >/dev/null 2>&1 || true
        buildah rm "$ctr" >/dev/null 2>&1 || true
    fi
    # --one-file-system: never follow into something still mounted below the work dir.
    rm -rf --one-file-system "$work"
    exit "$code"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

in_root() { chroot "$rootfs" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 HOME=/root "$@"; }

# --- wheels (host side): natgwd + its dependencies, for the rootfs's Python ---------------------

python=${PYTHON:-}
if [[ -z $python ]]; then
    for candidate in "$ROOT/.venv/bin/python" python3; do
        if "$candidate" -m pip --version >/dev/null 2>&1; then
            python=$candidate
            break
        fi
    done
fi
if [[ -z $python ]]; then
    log "no Python with pip found: making a throw-away venv"
    /usr/bin/python3 -m venv "$work/pip-venv" 2>/dev/null || {
        [[ ${NATGWD_NO_APT:-0} != 1 ]] || die "python3-venv is missing (NATGWD_NO_APT=1)"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
        /usr/bin/python3 -m venv "$work/pip-venv"
    }
    python=$work/pip-venv/bin/python
fi
pip=("$python" -m pip --disable-pip-version-check --no-input)

# Build from a copy of the sources: an in-tree setuptools build leaves build/ behind, and a
# stale build/lib can slip deleted modules into the wheel.
mkdir -p "$work/src" "$work/wheels"
sources=(pyproject.toml README.md natgwd)
for extra in "$ROOT"/LICENSE* "$ROOT"/MANIFEST.in "$ROOT"/setup.cfg; do
    [[ -e $extra ]] && sources+=("$(basename "$extra")")
done
tar -C "$ROOT" --exclude=__pycache__ --exclude='*.pyc' -cf - "${sources[@]}" | tar -C "$work/src" -xf -
log "building the natgwd wheel"
"${pip[@]}" wheel -q --no-deps -w "$work/wheels" "$work/src"
wheel=$(ls "$work/wheels"/natgwd-*.whl)
version=$(basename "$wheel" | cut -d- -f2)

# Binary wheels (rpds-py) must match the rootfs's CPython 3.11 and glibc (2.36), whatever
# Python runs this script.
machine=$(uname -m)
platforms=()
for minor in $(seq 36 -1 17); do platforms+=(--platform "manylinux_2_${minor}_${machine}"); done
platforms+=(--platform "manylinux2014_${machine}" --platform "manylinux2010_${machine}"
    --platform "manylinux1_${machine}")
log "downloading dependency wheels (pip cache: $("$python" -m pip cache dir 2>/dev/null || echo off))"
"${pip[@]}" download -q -d "$work/wheels" --only-binary=:all: \
    --python-version "$PY_VERSION" --implementation cp --abi "cp${PY_VERSION/./}" "${platforms[@]}" \
    "$wheel" pip

# --- base rootfs: debootstrap, updates, stripped (cached) ----------------------------------------

key=$(printf '%s\n' "$BASE_RECIPE" "$SUITE" "$MIRROR" "$SECURITY_MIRROR" "$PACKAGES" "$(dpkg --print-architecture)" |
    sha256sum | cut -c1-16)
base_tar=$CACHE/base-$key.tar
# One base build at a time (concurrent builds share the .deb cache); the others wait, then
# reuse its result.
exec 9>"$CACHE/.base.lock"
flock 9
if [[ -f $base_tar && $BASE_MAX_AGE_HOURS -gt 0 ]] &&
    [[ -n $(find "$base_tar" -mmin "-$((BASE_MAX_AGE_HOURS * 60))" 2>/dev/null) ]]; then
    log "reusing the base rootfs $base_tar"
    mkdir -p "$rootfs"
    tar -C "$rootfs" --numeric-owner -xpf "$base_tar"
else
    log "debootstrap $SUITE (minbase + $PACKAGES)"
    debootstrap --variant=minbase --include="$PACKAGES" --cache-dir="$CACHE/debs" \
        "$SUITE" "$rootfs" "$MIRROR" >"$work/debootstrap.log" 2>&1 || {
        tail -n 30 "$work/debootstrap.log" >&2
        die "debootstrap failed"
    }
    # The same sources as debian:12-slim, and its documentation filter for later installs.
    cat >"$rootfs/etc/apt/sources.list" <<EOF
deb $MIRROR $SUITE main
deb $MIRROR $SUITE-updates main
deb $SECURITY_MIRROR $SUITE-security main
EOF
    cat >"$rootfs/etc/dpkg/dpkg.cfg.d/docker" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/locale/*
EOF
    cat >"$rootfs/etc/apt/apt.conf.d/docker-clean" <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
    printf 'APT::Install-Recommends "false";\nAPT::Install-Suggests "false";\n' \
        >"$rootfs/etc/apt/apt.conf.d/docker-no-recommends"
    log "applying $SUITE-updates and $SUITE-security"
    cp /etc/resolv.conf "$rootfs/etc/resolv.conf"
    mount -t proc proc "$rootfs/proc"
    mount --bind /dev "$rootfs/dev"
    in_root apt-get -qq update
    in_root env DEBIAN_FRONTEND=noninteractive apt-get -qq -y -o Dpkg::Use-Pty=0 upgrade >/dev/null
    in_root apt-get -qq clean
    unmount_rootfs
    log "stripping docs, man pages, locales, apt lists and caches"
    find "$rootfs/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
    find "$rootfs/usr/share/doc" -mindepth 1 -type d -empty -delete
    rm -rf "$rootfs"/usr/share/{man,groff,info,lintian,linda}/* "$rootfs"/usr/share/locale/* \
        "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/* "$rootfs"/var/cache/debconf/*-old \
        "$rootfs"/var/lib/dpkg/*-old "$rootfs"/var/log/* "$rootfs"/tmp/* "$rootfs"/var/tmp/* \
        "$rootfs"/root/.cache
    # The runtime provides these.
    : >"$rootfs/etc/resolv.conf"
    : >"$rootfs/etc/machine-id"
    rm -rf "${rootfs:?}"/dev/* "$rootfs"/run/*
    tar -C "$rootfs" --numeric-owner -cpf "$base_tar.tmp.$$" .
    mv "$base_tar.tmp.$$" "$base_tar"
    find "$CACHE" -maxdepth 1 -name 'base-*.tar*' ! -name "base-$key.tar" -mmin +60 -delete
    find "$CACHE/debs" -name '*.deb' -mtime +30 -delete
fi
flock -u 9

# --- natgwd in a venv that sees Debian's python3-nftables ------------------------------------------

rootfs_py=$(in_root python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
[[ $rootfs_py == "$PY_VERSION" ]] || die "the rootfs has Python $rootfs_py, the wheels are for $PY_VERSION"
log "installing natgwd $version into $VENV"
mkdir -p "$rootfs/tmp/wheels" "$rootfs/dev"
cp "$work/wheels"/*.whl "$rootfs/tmp/wheels/"
mount -t proc proc "$rootfs/proc"
mount --bind /dev "$rootfs/dev"
in_root python3 -m venv --without-pip --system-site-packages "$VENV"
pip_wheel=$(cd "$rootfs/tmp/wheels" && ls pip-*.whl)
# pip runs from its wheel and is not left in the image.
in_root "$VENV/bin/python" "/tmp/wheels/$pip_wheel/pip" install -q --no-index --find-links /tmp/wheels \
    --no-cache-dir --disable-pip-version-check natgwd
rm -f "$rootfs$VENV"/bin/activate* "$rootfs$VENV"/bin/Activate.ps1
in_root "$VENV/bin/natgwd" --version
in_root "$VENV/bin/python" -c 'import nftables, pyroute2, natgwd.runtime.daemon'
in_root "$VENV/bin/natgwd" check /dev/stdin <"$ROOT/examples/seed.json" >/dev/null
unmount_rootfs
rm -rf "$rootfs/tmp/wheels" "$rootfs"/root/.cache "$rootfs"/tmp/* "${rootfs:?}"/dev/*
install -d -m 0755 "$rootfs/etc/natgwd"
install -d -m 0700 "$rootfs/var/lib/natgwd"
# Kube-OVN drop-in (controller unchanged): its `sleep infinity` starts natgwd, and its
# `bash /kube-ovn/nat-gateway.sh <subcommand> <rule>` execs: calls to natgwd's edit endpoint.
# LoadBalancer-Service pods run the same image and exec /kube-ovn/lb-svc.sh.
install -m 0755 "$ROOT/image/sleep-infinity.sh" "$rootfs$VENV/bin/sleep"
install -D -m 0755 "$ROOT/image/nat-gateway.sh" "$rootfs/kube-ovn/nat-gateway.sh"
install -D -m 0755 "$ROOT/image/lb-svc.sh" "$rootfs/kube-ovn/lb-svc.sh"

# --- image ----------------------------------------------------------------------------------------

log "committing $IMAGE"
old_id=$(buildah images --noheading --format '{{.ID}}' "$IMAGE" 2>/dev/null | head -n1 || true)
ctr=$(buildah from --format docker --name "natgwd-build-$$" scratch)
mnt=$(buildah mount "$ctr")
tar -C "$rootfs" --numeric-owner -cpf - . | tar -C "$mnt" --numeric-owner -xpf -
buildah umount "$ctr" >/dev/null
revision=$(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)
# One line: buildah splits the healthcheck like a shell. A 503 from /readyz raises: exit 1.
healthcheck_py='import os,sys,urllib.request as u; sys.exit(0 if u.urlopen(os.environ["NATGWD_HEALTH_URL"],timeout=4).status==200 else 1)'
buildah config \
    --os linux --arch "$(dpkg --print-architecture)" \
    --env PATH="$VENV/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
    --env LANG=C.UTF-8 --env PYTHONUNBUFFERED=1 \
    --env NATGWD_HEALTH_URL=http://127.0.0.1:9469/readyz \
    --workingdir / --user 0:0 --stop-signal SIGTERM --port 9469/tcp \
    --entrypoint "[\"$VENV/bin/natgwd\", \"run\", \"--state\", \"/etc/natgwd/state.json\", \"--applied-state\", \"/var/lib/natgwd/applied.json\"]" \
    --cmd '[]' \
    --healthcheck "CMD $VENV/bin/python -c '$healthcheck_py'" \
    --healthcheck-interval 10s --healthcheck-timeout 5s --healthcheck-start-period 20s --healthcheck-retries 3 \
    --label org.opencontainers.image.title=natgwd \
    --label org.opencontainers.image.description="VPC NAT gateway data plane (nftables SNAT/DNAT/FIP)" \
    --label org.opencontainers.image.version="$version" \
    --label org.opencontainers.image.revision="$revision" \
    --label org.opencontainers.image.licenses=Apache-2.0 \
    --label org.opencontainers.image.base.name="debian:$SUITE (debootstrap minbase)" \
    --label io.natgwd.capabilities="NET_ADMIN,NET_RAW" \
    "$ctr"
buildah commit --quiet --format docker --rm "$ctr" "$IMAGE" >/dev/null
ctr=""
new_id=$(buildah images --noheading --format '{{.ID}}' "$IMAGE" | head -n1)
if [[ -n $old_id && $old_id != "$new_id" ]]; then
    buildah rmi "$old_id" >/dev/null 2>&1 || true # still used by a container: leave it
fi

size=$(podman image inspect --format '{{.Size}}' "$IMAGE" 2>/dev/null || echo 0)
log "built $IMAGE ($new_id) natgwd $version"
echo "image: $IMAGE"
echo "image size: $size bytes ($((size / 1000000)) MB)"
echo "build time: $((SECONDS - started)) s"
