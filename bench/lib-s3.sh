# Sourced by bench scripts: SeaweedFS servers on free ports of 127.0.0.1, killed on exit.
# Needs WEED (the binary), KEY and SECRET (the one identity's credentials), log().
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
# start_weed DIR: a server in the background of this shell; sets S3 and FILER (ports).
start_weed() {
    local dir=$1 ports=() f
    mkdir -p "$dir/data"
    printf '{"identities":[{"name":"admin","credentials":[{"accessKey":"%s","secretKey":"%s"}],"actions":["Admin","Read","Write","List","Tagging"]}]}' "$KEY" "$SECRET" > "$dir/creds.json"
    local args=(mini "-dir=$dir/data" -ip=127.0.0.1 -ip.bind=127.0.0.1 -webdav=false -admin.ui=false -s3.autoCreateBucket=false "-s3.config=$dir/creds.json")
    for f in master.port master.port.grpc volume.port volume.port.grpc filer.port filer.port.grpc s3.port s3.port.grpc s3.port.iceberg s3.port.lance admin.port admin.port.grpc metricsPort s3.metricsPort; do
        local p; p=$(free_port); ports+=("$p"); args+=("-$f=$p")
    done
    # WEED_PREFIX: run the server under a command (files.sh SPLIT=1: `taskset -c 1`).
    ${WEED_PREFIX:-} "$WEED" "${args[@]}" > "$dir/weed.log" 2>&1 &
    PIDS+=($!)
    S3=${ports[6]} FILER=${ports[4]}
    for _ in $(seq 300); do
        curl -sf "http://127.0.0.1:$FILER/buckets/" >/dev/null 2>&1 && curl -s "http://127.0.0.1:$S3/" >/dev/null 2>&1 && break
        sleep 0.2
    done
}
mkbucket() { curl -sf -X POST "http://127.0.0.1:$1/buckets/$2/?op=mkdir" >/dev/null; sleep 0.5; }

# one_server DIR: a fresh server in DIR whose S3 endpoint custos (AWS_*) and rclone (remote
# `W:`) are pointed at. Needs WEED, KEY and SECRET as start_weed does.
one_server() {
    rm -rf "$1"
    start_weed "$1"
    export AWS_ACCESS_KEY_ID=$KEY AWS_SECRET_ACCESS_KEY=$SECRET AWS_ENDPOINT_URL="http://127.0.0.1:$S3" AWS_REGION=us-east-1
    export RCLONE_CONFIG_W_TYPE=s3 RCLONE_CONFIG_W_PROVIDER=Other RCLONE_CONFIG_W_ENDPOINT="http://127.0.0.1:$S3" RCLONE_CONFIG_W_ACCESS_KEY_ID=$KEY RCLONE_CONFIG_W_SECRET_ACCESS_KEY=$SECRET
}
