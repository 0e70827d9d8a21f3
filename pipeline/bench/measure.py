"""Runs one benchmark command and reports it as one JSON line (appended to --results) and a
human summary: wall seconds, events/s, MB/s of input, CPU-seconds (user + system), CPU
utilisation (CPU-seconds / wall; 200% = both cores of this machine) and peak RSS.

Usage: measure.py --name NAME --events N --bytes B [--subjects S] [--results FILE] -- COMMAND…
       measure.py --ratios < result lines of one compare.sh run
"""

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time


def ratios(lines):
    """Per cardinality: every sluice run against the Python reference, and against the base
    build when one ran."""
    rows = [json.loads(line) for line in lines if line.strip()]
    for subjects in dict.fromkeys(r["subjects"] for r in rows):
        group = [r for r in rows if r["subjects"] == subjects]
        reference = next((r for r in group if r["name"].startswith("python")), None)
        base = next((r for r in group if "base" in r["name"]), None)
        for s in group:
            if s is reference or s is base:
                continue
            line = f"{s['name']} ({subjects} subjects held): {s['cpu_percent']}% CPU, {s['peak_rss_mib']} MiB peak RSS"
            if reference:
                line += (f"; {s['events_per_s'] / reference['events_per_s']:.2f}x the reference's events/s, "
                         f"{s['cpu_us_per_event'] / reference['cpu_us_per_event']:.2f}x its CPU per event "
                         f"(reference: {reference['peak_rss_mib']} MiB)")
            if base:
                line += (f"; {s['events_per_s'] / base['events_per_s']:.2f}x the base build's events/s, "
                         f"{s['cpu_us_per_event'] / base['cpu_us_per_event']:.2f}x its CPU per event")
            print(line)


def main():
    if sys.argv[1:] == ["--ratios"]:
        return ratios(sys.stdin)
    p = argparse.ArgumentParser()
    p.add_argument("--name", required=True)
    p.add_argument("--events", type=int, required=True)
    p.add_argument("--bytes", type=int, required=True)
    p.add_argument("--subjects", type=int, default=None)
    p.add_argument("--results", default=None)
    p.add_argument("command", nargs=argparse.REMAINDER)
    a = p.parse_args()
    command = a.command[1:] if a.command[:1] == ["--"] else a.command
    start = time.monotonic()
    # The log goes to a file: a pipe read only at the end fills up (64 KiB) on a long run and
    # blocks the program mid-run.
    with tempfile.TemporaryFile() as log:
        child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log)
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.monotonic() - start
        log.seek(0)
        stderr = log.read().decode(errors="replace")
    if status != 0:
        sys.exit(f"{a.name} failed ({status}):\n{stderr[-3000:]}")
    cpu = usage.ru_utime + usage.ru_stime
    result = {
        "at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "name": a.name,
        "events": a.events,
        "subjects": a.subjects,
        "input_mb": round(a.bytes / 1e6, 1),
        "wall_s": round(wall, 2),
        "events_per_s": round(a.events / wall),
        "mb_per_s": round(a.bytes / 1e6 / wall, 1),
        "cpu_s": round(cpu, 2),
        "user_s": round(usage.ru_utime, 2),
        "sys_s": round(usage.ru_stime, 2),
        "cpu_percent": round(100 * cpu / wall),
        "cpu_us_per_event": round(1e6 * cpu / a.events, 1),
        "peak_rss_mib": round(usage.ru_maxrss / 1024),
    }
    if a.results:
        with open(a.results, "a") as f:
            f.write(json.dumps(result) + "\n")
    print(f"{a.name:<28} {result['wall_s']:>7.2f} s {result['events_per_s']:>9,} ev/s {result['mb_per_s']:>6.1f} MB/s "
          f"cpu {result['cpu_s']:>6.2f} s ({result['cpu_percent']}%) rss {result['peak_rss_mib']} MiB")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
