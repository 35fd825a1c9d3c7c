"""How a counting set's dump over netlink grows with the set's size: why the counting sets
are split into shards (natgwd.planning.layout.shard).

    python -m benchmarks.set_dump_size [--sizes 3250,6500,...] [--reads 5]   (as root)

In a fresh namespace, one `ct_dir . mark` counting set per size (as `rule_traffic_K` is
declared), each read whole by natgwd's own reader (natgwd.kernel.setdump) `--reads` times;
the time per element is what shows the kernel's restart of its walk for every 32 KB
message. Results go to benchmarks/results/set_dump_size-<UTC timestamp>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.netns import bare_gateway
from benchmarks.stats import summary, write_results

REPO = Path(__file__).resolve().parents[1]
TABLE = "dumpsize"
CHUNK = 5000  # elements per `nft add element`


def fill(namespace: str, size: int) -> None:
    def nft(script: str) -> None:
        subprocess.run(["ip", "netns", "exec", namespace, "nft", "-f", "-"], input=script, text=True, check=True)

    nft(f"add table inet {TABLE}\nadd set inet {TABLE} s{size} {{ type ct_dir . mark; counter; }}\n")
    for start in range(0, size, CHUNK):
        keys = (f"{('original', 'reply')[k % 2]} . {k // 2 + 1}" for k in range(start, min(size, start + CHUNK)))
        nft(f"add element inet {TABLE} s{size} {{ {', '.join(keys)} }}\n")


def worker(sizes: list[int], reads: int) -> dict[str, list[float]]:
    from natgwd.kernel.setdump import SetDumper, key_layout

    dumper = SetDumper(1, TABLE)  # NFPROTO_INET
    layout = key_layout("ct_dir . mark")
    found: dict[str, list[float]] = {}
    for size in sizes:
        times = []
        for _ in range(reads):
            started = time.perf_counter()
            listing = dumper.read(f"s{size}", layout)
            times.append(time.perf_counter() - started)
            if listing is None or len(listing) != size:
                raise RuntimeError(f"set of {size} listed {len(listing or ())} elements")
        found[str(size)] = times
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="3250,6500,13000,26000,52000,104000")
    parser.add_argument("--reads", type=int, default=5)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.worker:
        print(json.dumps(worker(sizes, args.reads)))
        return 0
    if os.geteuid() != 0:
        print("needs root: it creates a network namespace", file=sys.stderr)
        return 1
    with bare_gateway("ngwdump") as namespace:
        for size in sizes:
            fill(namespace, size)
        load = os.getloadavg()
        command = ["ip", "netns", "exec", namespace, sys.executable, "-m", "benchmarks.set_dump_size", "--worker"]
        command += ["--sizes", args.sizes, "--reads", str(args.reads)]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        out = subprocess.run(command, cwd=REPO, env=env, check=True, capture_output=True, text=True).stdout
    times: dict[str, list[float]] = json.loads(out)
    rows: dict[str, Any] = {}
    for size, values in times.items():
        rows[size] = {"seconds": summary(values), "us_per_element": 1e6 * float(summary(values)["median"]) / int(size)}
        print(
            f"{size:>7} elements: median {rows[size]['seconds']['median'] * 1000:8.1f} ms, "
            f"{rows[size]['us_per_element']:.2f} µs per element"
        )
    results = {
        "benchmark": "set_dump_size",
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "loadavg_start": load,
        "sizes": rows,
    }
    path = write_results("set_dump_size", results)
    print(f"results: {path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
