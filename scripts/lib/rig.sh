# shellcheck shell=bash
# The test rig: two Garage servers (primary sto1, secondary fra1) and one Pushgateway, all on
# free loopback ports, described to the tests by OFFSITE_TEST_* variables (tests/common/mod.rs).
# Sourced by scripts/test and scripts/rig after tools.sh and garage.sh; expects RIG_DIR and the
# ensure_* functions to have run (GARAGE_BIN, PUSHGATEWAY_BIN, PROMTOOL, ANSIBLE_PLAYBOOK,
# KUBERNETES_VALIDATE). The Pushgateway's pid joins GARAGE_PIDS, so garage_stop_all stops it too.

# pushgateway_launch: starts a Pushgateway on a free port; sets PUSHGATEWAY_PORT.
pushgateway_launch() {
    local port dir="$RIG_DIR/pushgateway"
    mkdir -p "$dir"
    port=$(free_ports 1)
    "$PUSHGATEWAY_BIN" --web.listen-address="127.0.0.1:$port" \
        >"$dir/server.log" 2>&1 </dev/null &
    GARAGE_PIDS+=("$!")
    for _ in $(seq 1 100); do
        (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
        sleep 0.1
    done
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
        echo "pushgateway: port $port not accepting connections" >&2
        tail -n 20 "$dir/server.log" >&2
        return 1
    fi
    PUSHGATEWAY_PORT=$port
}

# rig_start: everything up, OFFSITE_TEST_* exported.
rig_start() {
    garage_launch PRIMARY sto1
    garage_launch SECONDARY fra1
    garage_setup PRIMARY
    garage_setup SECONDARY
    pushgateway_launch
    export OFFSITE_TEST_GARAGE_BIN="$GARAGE_BIN"
    export OFFSITE_TEST_PRIMARY_ENDPOINT="http://127.0.0.1:${PRIMARY_S3_PORT}"
    export OFFSITE_TEST_PRIMARY_REGION=sto1
    export OFFSITE_TEST_PRIMARY_KEY_ID="$PRIMARY_KEY_ID"
    export OFFSITE_TEST_PRIMARY_SECRET="$PRIMARY_SECRET"
    export OFFSITE_TEST_PRIMARY_GARAGE_CONFIG="$PRIMARY_CONF"
    export OFFSITE_TEST_SECONDARY_ENDPOINT="http://127.0.0.1:${SECONDARY_S3_PORT}"
    export OFFSITE_TEST_SECONDARY_REGION=fra1
    export OFFSITE_TEST_SECONDARY_KEY_ID="$SECONDARY_KEY_ID"
    export OFFSITE_TEST_SECONDARY_SECRET="$SECONDARY_SECRET"
    export OFFSITE_TEST_SECONDARY_GARAGE_CONFIG="$SECONDARY_CONF"
    export OFFSITE_TEST_PUSHGATEWAY="http://127.0.0.1:${PUSHGATEWAY_PORT}"
    export OFFSITE_TEST_PROMTOOL="$PROMTOOL"
    export OFFSITE_TEST_ANSIBLE_PLAYBOOK="$ANSIBLE_PLAYBOOK"
    export OFFSITE_TEST_KUBERNETES_VALIDATE="$KUBERNETES_VALIDATE"
    echo "garage: primary   ${OFFSITE_TEST_PRIMARY_ENDPOINT} (pid ${PRIMARY_PID})"
    echo "garage: secondary ${OFFSITE_TEST_SECONDARY_ENDPOINT} (pid ${SECONDARY_PID})"
    echo "pushgateway:      ${OFFSITE_TEST_PUSHGATEWAY}"
}

# rig_env: the exported variables as shell lines (for .tools/rig.env).
rig_env() {
    local v
    for v in $(compgen -e | grep '^OFFSITE_TEST_' | grep -v '^OFFSITE_TEST_RCLONE'); do
        printf "export %s=%q\n" "$v" "${!v}"
    done
}
