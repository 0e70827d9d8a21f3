#!/usr/bin/env bash
# Benchmark (not a test): a current-state table beside its log, on the release build. A
# snapshot of LIVE accounts (default 10,000,000 `r` events), then CHANGES changes (default
# 1,000,000: 90% updates, 5% deletes, 5% creates) touching KEYS distinct accounts (default
# 300,000). Run twice in the same session: the log alone (the reference) and the log with
# `current = true`; reports each phase's wall time, CPU-seconds and peak RSS, the ratio of the
# two, what the merges did, and how far the current table lagged its log.
# Usage: pipeline/bench/current.sh [LIVE] [CHANGES] [KEYS]   (after tests/run.sh has made
# .venv; needs GNU time at /usr/bin/time)
set -euo pipefail
cd "$(dirname "$0")/../.."
. pipeline/bench/lib.sh
live=${1:-10000000}
changes=${2:-1000000}
keys=${3:-300000}
out=${BENCH_DIR:-target/bench-current}
cargo build --release --locked -p sluice
bin=$PWD/target/release/sluice
rm -rf "$out" && mkdir -p "$out/events"
.venv/bin/python - "$out/events" "$live" "$changes" "$keys" <<'PY'
import sys, random
out, live, changes, keys = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
rng = random.Random(7)
def line(op, i, status, balance, ts):
    row = f'{{"id":{i},"customer_id":"c{i // 3}","status":"{status}","balance":{balance}}}'
    before, after = (row, "null") if op == "d" else ("null", row)
    return (f'{{"before":{before},"after":{after},"op":"{op}","ts_ms":{ts},'
            f'"source":{{"schema":"public","table":"accounts","ts_ms":{ts}}}}}\n')
with open(f"{out}/1-snapshot.jsonl", "w") as f:
    for i in range(live):
        f.write(line("r", i, "open", i % 10_000, 1704067200000))
hot = rng.sample(range(live), keys)
alive = set(hot)  # the changes touch only these
with open(f"{out}/2-changes.jsonl", "w") as f:
    for n in range(changes):
        ts = 1704153600000 + n
        k = rng.choice(hot)
        if k not in alive:
            alive.add(k)
            f.write(line("c", k, "open", n % 10_000, ts))
        elif rng.random() < 0.05:
            alive.discard(k)
            f.write(line("d", k, "closed", 0, ts))
        else:
            f.write(line("u", k, rng.choice(["open", "late", "closed"]), n % 10_000, ts))
PY
for variant in log current; do
  dir="$out/$variant"
  mkdir -p "$dir/policies" "$dir/events"
  cat > "$dir/policies/accounts.toml" <<TOML
table = "public.accounts"
target = "accounts"
subject = "customer_id"
token_domain = "customer"
key = ["id"]
current = $([ "$variant" = current ] && echo true || echo false)
[columns.id]
action = "keep"
type = "int64"
[columns.customer_id]
action = "tokenize"
[columns.status]
action = "keep"
type = "string"
[columns.balance]
action = "keep"
type = "int64"
TOML
  file_pipeline_config "$dir" policies
  for phase in 1-snapshot 2-changes; do
    ln -f "$out/events/$phase.jsonl" "$dir/events/$phase.jsonl"
    (cd "$dir" && /usr/bin/time -f "%e %U %S %M" -o "time-$phase" "$bin" --log-format json run --config sluice.toml --once \
      2> "log-$phase.jsonl" > /dev/null)
  done
done
.venv/bin/python - "$out" "$live" "$changes" "$keys" <<'PY'
import sys, json, datetime, statistics
out, live, changes, keys = sys.argv[1], *map(int, sys.argv[2:])
def timing(variant, phase):
    wall, user, system, rss = open(f"{out}/{variant}/time-{phase}").read().split()[-4:]
    return float(wall), float(user) + float(system), int(rss) / 1024
def log(variant, phase):
    lines = []
    for l in open(f"{out}/{variant}/log-{phase}.jsonl"):
        try:
            lines.append(json.loads(l))
        except ValueError:
            pass
    return lines
print(f"{live:,} live rows, then {changes:,} changes on {keys:,} keys (release build, same session)")
for phase, events in (("1-snapshot", live), ("2-changes", changes)):
    (lw, lc, lr), (cw, cc, cr) = timing("log", phase), timing("current", phase)
    print(f"{phase}: log only {lw:.1f} s wall, {lc:.1f} CPU-s, {lr:.0f} MiB; with the current table "
          f"{cw:.1f} s wall, {cc:.1f} CPU-s, {cr:.0f} MiB -> {cw / lw:.2f}x the wall time, "
          f"{events / cw:,.0f} events/s ({events / lw:,.0f} log only)")
    lines = log("current", phase)
    merges = [l["fields"] for l in lines if l.get("fields", {}).get("message") == "merged"]
    if merges:
        print(f"  {len(merges)} merges: {sum(m['keys'] for m in merges):,} keys, files rewritten "
              f"{sum(m['files_rewritten'] for m in merges):,}, kept by their Bloom filter "
              f"{sum(m['files_kept'] for m in merges):,}, rows copied {sum(m['rows_kept'] for m in merges):,}")
    # Lag: for each merge, how long the oldest log commit it covers had been waiting.
    commits = [(datetime.datetime.fromisoformat(l["timestamp"].replace("Z", "+00:00")), l["fields"])
               for l in lines if l.get("fields", {}).get("message") == "committed"]
    last_merge, waiting, lags, merge_ms = None, None, [], []
    for at, f in commits:
        if f["table"] == "accounts" and waiting is None:
            waiting = at
        elif f["table"] == "accounts_current":
            merge_ms.append(f["ms"])
            if waiting is not None:
                lags.append((at - waiting).total_seconds())
            waiting = None
    if lags:
        print(f"  current table behind its log: median {statistics.median(lags):.1f} s, max {max(lags):.1f} s; "
              f"a merge's commit took median {statistics.median(merge_ms) / 1000:.1f} s, max {max(merge_ms) / 1000:.1f} s")
PY
