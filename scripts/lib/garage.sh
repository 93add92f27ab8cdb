# shellcheck shell=bash
# Start single-node Garage servers for the integration tests.
# Sourced by scripts/test; expects GARAGE_BIN and RIG_DIR. Server pids are appended to
# GARAGE_PIDS so that the caller's trap can stop them.

GARAGE_PIDS=()

# free_ports N: prints N distinct free TCP ports on 127.0.0.1, one per line. All sockets are held
# open until every port is picked, so the N ports are distinct.
free_ports() {
    python3 - "$1" <<'PY'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    socks.append(s)
for s in socks:
    print(s.getsockname()[1])
for s in socks:
    s.close()
PY
}

random_hex() { # random_hex NBYTES
    python3 -c 'import secrets, sys; print(secrets.token_hex(int(sys.argv[1])))' "$1"
}

# garage_write_config DIR REGION RPC S3 ADMIN: writes DIR/garage.toml
garage_write_config() {
    local dir=$1 region=$2 rpc=$3 s3=$4 admin=$5
    mkdir -p "$dir/meta" "$dir/data"
    cat >"$dir/garage.toml" <<TOML
metadata_dir = "$dir/meta"
data_dir = "$dir/data"
db_engine = "sqlite"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:$rpc"
rpc_public_addr = "127.0.0.1:$rpc"
rpc_secret = "$(random_hex 32)"

[s3_api]
s3_region = "$region"
api_bind_addr = "127.0.0.1:$s3"
root_domain = ".s3.garage.localhost"

[admin]
api_bind_addr = "127.0.0.1:$admin"
admin_token = "$(random_hex 24)"
TOML
    chmod 600 "$dir/garage.toml"
}

# garage_launch NAME REGION: picks ports, writes the config, starts the server in the background.
# Sets <NAME>_DIR, <NAME>_CONF, <NAME>_S3_PORT, <NAME>_PID (NAME is upper case, e.g. PRIMARY).
garage_launch() {
    local name=$1 region=$2 dir ports
    dir="$RIG_DIR/${name,,}"
    mapfile -t ports < <(free_ports 3)
    garage_write_config "$dir" "$region" "${ports[0]}" "${ports[1]}" "${ports[2]}"
    # The server must not inherit the caller's stdout/stderr (it would keep pipes open).
    RUST_LOG="${GARAGE_RUST_LOG:-garage=warn}" \
        "$GARAGE_BIN" -c "$dir/garage.toml" server >"$dir/server.log" 2>&1 </dev/null &
    local pid=$!
    GARAGE_PIDS+=("$pid")
    printf -v "${name}_DIR" '%s' "$dir"
    printf -v "${name}_CONF" '%s' "$dir/garage.toml"
    printf -v "${name}_S3_PORT" '%s' "${ports[1]}"
    printf -v "${name}_PID" '%s' "$pid"
}

garage_fail() { # garage_fail NAME MESSAGE
    local dir="$RIG_DIR/${1,,}"
    echo "garage $1: $2" >&2
    if [ -f "$dir/server.log" ]; then
        echo "--- last lines of $dir/server.log ---" >&2
        tail -n 30 "$dir/server.log" >&2
    fi
    return 1
}

# garage_setup NAME: waits for the node launched by garage_launch, assigns and applies the
# layout, creates a key allowed to create buckets. Sets <NAME>_KEY_ID and <NAME>_SECRET.
garage_setup() {
    local name=$1 conf pid node_id="" out key_id secret
    conf="${name}_CONF"; conf=${!conf}
    pid="${name}_PID"; pid=${!pid}
    local g=("$GARAGE_BIN" -c "$conf")
    for _ in $(seq 1 300); do
        if ! kill -0 "$pid" 2>/dev/null; then
            garage_fail "$name" "server exited during start-up"
            return 1
        fi
        # `node id` only reads the key file the server writes at start-up (it does not contact
        # the server), so also wait for `status`, which needs the RPC port.
        if node_id=$("${g[@]}" node id -q 2>/dev/null) && [ -n "$node_id" ] &&
            "${g[@]}" status >/dev/null 2>&1; then
            break
        fi
        node_id=""
        sleep 0.1
    done
    [ -n "$node_id" ] || { garage_fail "$name" "RPC not answering after 30 s"; return 1; }
    node_id=${node_id%%@*}
    "${g[@]}" layout assign -z dc1 -c 1G "$node_id" >/dev/null ||
        { garage_fail "$name" "layout assign failed"; return 1; }
    "${g[@]}" layout apply --version 1 >/dev/null ||
        { garage_fail "$name" "layout apply failed"; return 1; }
    out=$("${g[@]}" key create offsite-test) ||
        { garage_fail "$name" "key create failed"; return 1; }
    key_id=$(awk -F': *' '/^Key ID:/ {print $2; exit}' <<<"$out" | tr -d '[:space:]')
    secret=$(awk -F': *' '/^Secret key:/ {print $2; exit}' <<<"$out" | tr -d '[:space:]')
    if [ -z "$key_id" ] || [ -z "$secret" ]; then
        garage_fail "$name" "cannot parse 'key create' output (Key ID / Secret key lines missing)"
        return 1
    fi
    "${g[@]}" key allow --create-bucket "$key_id" >/dev/null ||
        { garage_fail "$name" "key allow --create-bucket failed"; return 1; }
    local port="${name}_S3_PORT"; port=${!port}
    for _ in $(seq 1 100); do
        (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
        sleep 0.1
    done
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null ||
        { garage_fail "$name" "S3 port $port not accepting connections"; return 1; }
    printf -v "${name}_KEY_ID" '%s' "$key_id"
    printf -v "${name}_SECRET" '%s' "$secret"
}

# garage_stop_all: SIGTERM every server, wait up to 10 s, then SIGKILL what is left.
garage_stop_all() {
    local pid alive
    [ "${#GARAGE_PIDS[@]}" -gt 0 ] || return 0
    for pid in "${GARAGE_PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for _ in $(seq 1 100); do
        alive=0
        for pid in "${GARAGE_PIDS[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
        [ "$alive" -eq 0 ] && break
        sleep 0.1
    done
    for pid in "${GARAGE_PIDS[@]}"; do
        if kill -0 "$pid" 2>/dev/null; then
            echo "garage: pid $pid ignored SIGTERM for 10 s, sending SIGKILL" >&2
            kill -KILL "$pid" 2>/dev/null || true
        fi
    done
    for pid in "${GARAGE_PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    GARAGE_PIDS=()
}
