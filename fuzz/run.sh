#!/usr/bin/env bash
# Build and run the fuzz targets one after another (one libFuzzer job at a time), each for
# SECONDS with its corpus, and print per target the executions, exec/s, coverage and any crash.
#
# Usage: fuzz/run.sh SECONDS [TARGET...]       fuzz each target (default: all) for SECONDS
#        fuzz/run.sh --regressions [TARGET...]  run every input under regressions/TARGET once
#
# Exits 1 when a target crashed (or, with --regressions, when a kept input still crashes),
# 2 on usage or build errors.
#
# Environment:
#   SANITIZER  cargo-fuzz sanitizer: none (default) or address (see README.md)
#   MAX_LEN    libFuzzer -max_len (default 65536)
#   TIMEOUT    seconds one input may take before it counts as a hang (default 20)
#   FUZZ_ARGS  extra libFuzzer arguments, e.g. "-seed=1"
#
# Corpora: corpus/TARGET (grows, not committed) is written to; seeds/TARGET (committed, made by
# examples/gen_seeds.rs) is read. Crash inputs land in artifacts/TARGET/.
#
# libFuzzer needs nightly compiler features (-Zsanitizer, sanitizer coverage flags); the stable
# compiler accepts them with RUSTC_BOOTSTRAP=1, which this script sets for cargo-fuzz only.
set -euo pipefail

cd "$(dirname -- "${BASH_SOURCE[0]}")"
export RUSTC_BOOTSTRAP=1
SANITIZER=${SANITIZER:-none}
MAX_LEN=${MAX_LEN:-65536}
TIMEOUT=${TIMEOUT:-20}
read -r -a EXTRA <<<"${FUZZ_ARGS:-}"

usage() {
    sed -n '4,5p' "${BASH_SOURCE[0]}" | sed 's/^# //' >&2
    exit 2
}

[ $# -ge 1 ] || usage
mode=fuzz
if [ "$1" = --regressions ]; then
    mode=regressions
    shift
else
    SECONDS_EACH=$1
    shift
    [[ $SECONDS_EACH =~ ^[0-9]+$ ]] || usage
fi

command -v cargo-fuzz >/dev/null || {
    echo "run.sh: cargo-fuzz not found; install it with: cargo install cargo-fuzz" >&2
    exit 2
}
mapfile -t ALL < <(cargo fuzz list)
if [ $# -gt 0 ]; then
    TARGETS=("$@")
    for t in "${TARGETS[@]}"; do
        printf '%s\n' "${ALL[@]}" | grep -qx -- "$t" || {
            echo "run.sh: unknown target $t (targets: ${ALL[*]})" >&2
            exit 2
        }
    done
else
    TARGETS=("${ALL[@]}")
fi

mkdir -p logs
echo "run.sh: building ${TARGETS[*]} (sanitizer $SANITIZER)" >&2
for t in "${TARGETS[@]}"; do
    if ! cargo fuzz build -s "$SANITIZER" "$t" >"logs/build-$t.log" 2>&1; then
        tail -n 30 "logs/build-$t.log" >&2
        echo "run.sh: building $t failed (log: fuzz/logs/build-$t.log)" >&2
        exit 2
    fi
done

# The value of libFuzzer's final `stat::NAME:` line in a log.
stat() { sed -n "s/^stat::$1: *//p" "$2" | tail -n 1; }
# The last value of a `NAME: N` field in libFuzzer's status lines (empty when there is none).
last_field() { { grep -oE "$1: [0-9]+" "$2" || true; } | tail -n 1 | cut -d' ' -f2; }
# Size of a file in bytes.
stat_size() { wc -c <"$1" | tr -d ' '; }

# The first panic (location and message) or sanitizer error of a log, on one line.
first_error() {
    { grep -m1 -A1 -E "panicked at|ERROR: libFuzzer|ERROR: AddressSanitizer" "$1" || true; } |
        tr '\n' ' ' | sed -E "s/thread '([^']*)' \([0-9]+\) /thread '\1' /; s/==[0-9]+==/==/g"
}

crashed=0
if [ "$mode" = regressions ]; then
    for t in "${TARGETS[@]}"; do
        [ -d "regressions/$t" ] || continue
        for input in "regressions/$t"/*; do
            [ -f "$input" ] || continue
            log="logs/regression-$t-$(basename -- "$input").log"
            if cargo fuzz run -s "$SANITIZER" "$t" "$input" -- -runs=1 >"$log" 2>&1; then
                printf '%-14s %-40s passes\n' "$t" "$input"
            else
                crashed=1
                msg=$(first_error "$log")
                printf '%-14s %-40s CRASHES: %s\n' "$t" "$input" "$msg"
            fi
        done
    done
    exit "$crashed"
fi

# The panic (location and message) or sanitizer error an input causes, on one line.
error_of() {
    local log
    log=$(mktemp)
    cargo fuzz run -s "$SANITIZER" "$1" "$2" -- -runs=1 >"$log" 2>&1 || true
    first_error "$log"
    rm -f -- "$log"
}

printf '%-14s %12s %9s %8s %8s  %s\n' target executions exec/s cov ft result
for t in "${TARGETS[@]}"; do
    mkdir -p "corpus/$t" "artifacts/$t"
    dirs=("corpus/$t")
    [ -d "seeds/$t" ] && dirs+=("seeds/$t")
    log="logs/$t.log"
    marker=$(mktemp)
    start=$(date +%s)
    status=0
    cargo fuzz run -s "$SANITIZER" "$t" "${dirs[@]}" -- \
        -max_total_time="$SECONDS_EACH" -timeout="$TIMEOUT" -max_len="$MAX_LEN" \
        -print_final_stats=1 "${EXTRA[@]}" >"$log" 2>&1 || status=$?
    elapsed=$(($(date +%s) - start))
    mapfile -t new < <(find "artifacts/$t" -type f -newer "$marker" | sort)
    rm -f -- "$marker"
    # Plain runs end with `stat::` lines; -fork=N runs only print `#N: cov: … exec/s: …` lines.
    execs=$(stat number_of_executed_units "$log")
    [ -n "$execs" ] || execs=$({ grep -oE '^#[0-9]+' "$log" || true; } | tail -n 1 | tr -d '#')
    rate=$(stat average_exec_per_sec "$log")
    [ -n "$rate" ] || { [ -n "$execs" ] && [ "$elapsed" -gt 0 ] && rate=$((execs / elapsed)); }
    cov=$(last_field cov "$log")
    ft=$(last_field ft "$log")
    if [ "$status" -eq 0 ] && [ ${#new[@]} -eq 0 ]; then
        result="ok (${elapsed}s)"
    elif [ ${#new[@]} -eq 0 ]; then
        crashed=1
        result="FAILED after ${elapsed}s (exit $status, no artifact): $(first_error "$log")"
    else
        crashed=1
        result="CRASH after ${elapsed}s: ${#new[@]} artifact(s) in fuzz/artifacts/$t/"
    fi
    printf '%-14s %12s %9s %8s %8s  %s\n' "$t" "${execs:--}" "${rate:--}" "${cov:--}" "${ft:--}" "$result"
    # Each distinct failure once, with one input that shows it.
    declare -A seen=()
    for a in "${new[@]}"; do
        msg=$(error_of "$t" "$a")
        [ -n "${seen["m:$msg"]+x}" ] && continue
        seen["m:$msg"]=1
        printf '    %s (%s bytes): %s\n' "$a" "$(stat_size "$a")" "${msg:-no panic message}"
    done
    unset seen
done
echo "run.sh: logs in fuzz/logs/" >&2
exit "$crashed"
