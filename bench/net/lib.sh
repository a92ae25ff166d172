# Shell helpers shared by bench/net/guest.sh and bench/net/ab.sh (sourced, not run). They use
# the caller's $work (a scratch directory), $NICE and the array pids.

start() { # NAME CMD...: runs CMD in the background under $NICE, logs in $work/NAME.log
    local name=$1; shift
    $NICE "$@" >"$work/$name.log" 2>&1 &
    pids+=($!)
}
wait_path() { # PATH SECONDS
    local end=$((SECONDS + $2))
    until [ -e "$1" ]; do
        [ $SECONDS -lt $end ] || { echo "$(basename "$0"): $1 did not appear" >&2; exit 1; }
        sleep 0.1
    done
}
stop_pids() { # stops every process in pids (TERM, then KILL half a second later) and reaps it
    local p
    for p in "${pids[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done
    sleep 0.5
    for p in "${pids[@]:-}"; do [ -n "$p" ] && kill -9 "$p" 2>/dev/null || true; done
    for p in "${pids[@]:-}"; do [ -n "$p" ] && wait "$p" 2>/dev/null || true; done
    pids=()
}
