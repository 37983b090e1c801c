"""Freshness: from publishing an event to seeing it in GET /users/{id}/features, under load.

    python bench/freshness.py                          # 20 s at 10,000 events/s
    python bench/freshness.py --seconds 5 --rate 2000  # a quick run

Three processes on loopback: `tipstream run` (against a nats-server started here),
`tipstream simulate` publishing background traffic at `--rate`, and this one, which
every `--every-ms` publishes one probe event for a fresh user and polls the features
endpoint until that user appears.
Last line: {"bench": "freshness", "p50_ms": ..., "p99_ms": ..., "events_per_s": ...}
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx
import nats
import orjson
from _harness import add_settings_option, free_port, service_environment, settings_given

from app.embedded_nats import EmbeddedNats

BIN = Path(sys.executable).parent


async def wait_ready(base: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient() as http:
        while time.monotonic() < deadline:
            try:
                if (await http.get(f"{base}/readyz")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.1)
    raise SystemExit("the service did not become ready")


async def applied(http: httpx.AsyncClient, base: str) -> float:
    text = (await http.get(f"{base}/metrics")).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("tipstream_events_applied_total"))


async def wait_for_load(base: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient() as http:
        while await applied(http, base) < 5_000:
            if time.monotonic() > deadline:
                raise SystemExit("the background load never arrived")
            await asyncio.sleep(0.2)
    await asyncio.sleep(0.5)


async def probe(js, http: httpx.AsyncClient, base: str, index: int) -> float:
    user = f"probe-{index}"
    event = {"id": f"probe-{index}", "type": "app.opened", "user_id": user,
             "ts": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())}
    started = time.perf_counter()
    await js.publish("signals.app.opened", orjson.dumps(event), headers={"Nats-Msg-Id": event["id"]})
    while True:
        body = (await http.get(f"{base}/users/{user}/features")).json()
        if body["known"]:
            return (time.perf_counter() - started) * 1000
        if time.perf_counter() - started > 5:
            raise SystemExit(f"probe {index} not visible after 5 s")
        await asyncio.sleep(0.002)  # polling harder would steal the CPU it is measuring


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--rate", type=float, default=10_000)
    parser.add_argument("--every-ms", type=float, default=50)
    add_settings_option(parser)
    args = parser.parse_args()
    settings = settings_given(parser, args.set)

    with tempfile.TemporaryDirectory() as tmp:
        server = EmbeddedNats(Path(tmp) / "nats")
        url = server.start()
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        env = service_environment(**{"data_dir": f"{tmp}/data", "port": port, "log_level": "warning", **settings})
        env["NATS_URL"] = url
        service = subprocess.Popen([str(BIN / "tipstream"), "run"], env=env)
        load = None
        try:
            await wait_ready(base)
            load = subprocess.Popen([str(BIN / "tipstream"), "simulate", "--rate", str(args.rate), "--duration",
                                     str(args.seconds + 2), "--users", "5000", "--nats-url", url, "--quiet",
                                     "--pregenerate"],
                                    stdout=subprocess.DEVNULL)
            await wait_for_load(base)  # the generator makes its events first, then publishes
            nc = await nats.connect(url)
            js = nc.jetstream()
            latencies: list[float] = []
            started = time.monotonic()
            async with httpx.AsyncClient() as http:
                applied_at_start = await applied(http, base)
                index = 0
                while time.monotonic() - started < args.seconds:
                    tick = time.monotonic()
                    latencies.append(await probe(js, http, base, index))
                    index += 1
                    await asyncio.sleep(max(0.0, args.every_ms / 1000 - (time.monotonic() - tick)))
                applied_during = await applied(http, base) - applied_at_start
            elapsed = time.monotonic() - started
            await nc.close()
        finally:
            if load:
                load.wait(30)
            service.terminate()
            service.wait(30)
            server.stop()

    latencies.sort()
    p50 = statistics.median(latencies)
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    rate = applied_during / elapsed
    print(f"{len(latencies)} probes under ~{args.rate:,.0f} events/s background load: "
          f"p50 {p50:.1f} ms, p99 {p99:.1f} ms, max {latencies[-1]:.1f} ms (goal: p99 < 50 ms)")
    print(f"events applied per second during the run: {rate:,.0f}")
    print(json.dumps({"bench": "freshness", "p50_ms": round(p50, 2), "p99_ms": round(p99, 2),
                      "events_per_s": round(rate), "probes": len(latencies)}))


if __name__ == "__main__":
    asyncio.run(main())
