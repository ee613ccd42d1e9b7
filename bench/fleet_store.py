"""Central store and uplink figures for docs/fleet.md, measured side by side in one run.

Simulated devices (daemon.fleet.simdevice) are scraped by one device Prometheus with the shipped rules
and the series budget; its vmagent fans the samples out to two central stores at once: VictoriaMetrics
and Prometheus with --web.enable-remote-write-receiver and an out-of-order window. Reported:

  * per device: series shipped, samples/s, uplink bytes per sample (vmagent's compressed blocks);
  * per store: RSS, disk, CPU per ingested sample (the same samples reach both);
  * late samples: what each store keeps of samples 30 min, 3 h and 30 h old (a backlog after an outage);
  * an outage of both stores for --outage-minutes: vmagent's disk queue per device-hour, the samples
    each store holds for the outage window afterwards against the device Prometheus's own.

  python bench/fleet_store.py --devices 50 --minutes 5 --outage-minutes 10
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request

import psutil

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from daemon.fleet.procs import Proc, binary, free_port  # noqa: E402
from daemon.fleet.simdevice import DeviceSpec  # noqa: E402
from daemon.monitoring import rules, shipping  # noqa: E402

INTERVAL_S = 1.0   # scrape interval of the bench (30 s in production: figures are per sample, then scaled)
PROD_INTERVAL_S = 30.0


def get(url: str, params: dict | None = None) -> dict:
    if params:
        url += "?" + urllib.parse.urlencode(params)
    with urllib.request.urlopen(url, timeout=60) as resp:  # noqa: S310 - loopback
        return json.loads(resp.read())


def scalar(url: str, expr: str) -> float:
    result = get(f"{url}/api/v1/query", {"query": expr})["data"]["result"]
    return float(result[0]["value"][1]) if result else 0.0


def metric(url: str, name: str) -> float:
    """Sum of a metric's samples on a /metrics page."""
    total = 0.0
    with urllib.request.urlopen(f"{url}/metrics", timeout=30) as resp:  # noqa: S310
        for line in resp.read().decode().splitlines():
            if line.startswith(name) and (line[len(name)] in " {"):
                total += float(line.rsplit(" ", 1)[1])
    return total


def du(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def cpu_seconds(proc: Proc) -> float:
    times = psutil.Process(proc.popen.pid).cpu_times()
    return times.user + times.system


def rss(proc: Proc) -> int:
    return psutil.Process(proc.popen.pid).memory_info().rss


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=50)
    parser.add_argument("--minutes", type=float, default=5.0, help="steady ingest before the outage")
    parser.add_argument("--outage-minutes", type=float, default=10.0)
    ns = parser.parse_args()
    work = tempfile.mkdtemp(prefix="edgechat-fleet-bench-")
    ports = {k: free_port() for k in ("vm", "prom", "device", "vmagent")}
    procs: list[Proc] = []
    try:
        specs = [DeviceSpec(f"sim-bench-{i:03d}", 0, "healthy", "1.3.2", time_scale=INTERVAL_S / PROD_INTERVAL_S,
                            seed=i) for i in range(ns.devices)]
        with open(os.path.join(work, "devices.json"), "w") as handle:
            json.dump([s.__dict__ for s in specs], handle)
        sim = Proc("sims", [sys.executable, "-m", "daemon.fleet.simdevice", os.path.join(work, "devices.json"),
                            os.path.join(work, "ports.json")], os.path.join(work, "sims.log")).start()
        procs.append(sim)
        while not os.path.exists(os.path.join(work, "ports.json")):
            time.sleep(0.2)
        with open(os.path.join(work, "ports.json")) as handle:
            sim_ports = json.load(handle)
        with open(os.path.join(work, "targets.json"), "w") as handle:
            json.dump(shipping.file_sd_targets([(f"127.0.0.1:{p}", n) for n, p in sim_ports.items()]), handle)
        vm = Proc("victoria-metrics", [binary("victoria-metrics"), f"-storageDataPath={work}/vm",
                                       f"-httpListenAddr=127.0.0.1:{ports['vm']}", "-retentionPeriod=1y",
                                       "-loggerLevel=WARN", "-search.latencyOffset=1s"],
                  os.path.join(work, "vm.log"), ports=(ports["vm"],))
        with open(os.path.join(work, "receiver.yml"), "w") as handle:
            handle.write("storage:\n  tsdb:\n    out_of_order_time_window: 24h\n")
        prom = Proc("prometheus-receiver", [binary("prometheus"), f"--config.file={work}/receiver.yml",
                                            f"--storage.tsdb.path={work}/prom", "--web.enable-remote-write-receiver",
                                            f"--web.listen-address=127.0.0.1:{ports['prom']}", "--log.level=warn"],
                    os.path.join(work, "prom.log"), ports=(ports["prom"],))
        vmagent = Proc("vmagent", [binary("vmagent"), f"-httpListenAddr=127.0.0.1:{ports['vmagent']}",
                                   f"-remoteWrite.url=http://127.0.0.1:{ports['vm']}/api/v1/write",
                                   f"-remoteWrite.url=http://127.0.0.1:{ports['prom']}/api/v1/write",
                                   f"-remoteWrite.tmpDataPath={work}/vmagent", "-loggerLevel=ERROR"],
                       os.path.join(work, "vmagent.log"), ports=(ports["vmagent"],))
        rule_files = rules.write(os.path.join(work, "rules"), INTERVAL_S / PROD_INTERVAL_S)
        config = shipping.device_prometheus_config(shipping.Device(
            site="bench", version="1.3.2", model="sim", file_sd=os.path.join(work, "targets.json"),
            vmagent_url=f"http://127.0.0.1:{ports['vmagent']}/api/v1/write", rule_files=tuple(rule_files),
            scrape_interval_s=INTERVAL_S, evaluation_interval_s=INTERVAL_S), shipping.Uplink(("127.0.0.1:9",)))
        with open(os.path.join(work, "device.yml"), "w") as handle:
            handle.write(shipping.dump(config))
        device = Proc("device-prometheus", [binary("prometheus"), f"--config.file={work}/device.yml",
                                            f"--storage.tsdb.path={work}/device", "--log.level=warn",
                                            f"--web.listen-address=127.0.0.1:{ports['device']}"],
                      os.path.join(work, "device.log"), ports=(ports["device"],))
        urls = {"vm": f"http://127.0.0.1:{ports['vm']}", "prom": f"http://127.0.0.1:{ports['prom']}",
                "device": f"http://127.0.0.1:{ports['device']}", "vmagent": f"http://127.0.0.1:{ports['vmagent']}"}
        for proc, ready in ((vm, "/health"), (prom, "/-/ready"), (vmagent, "/health"), (device, "/-/ready")):
            procs.append(proc.start())
            proc.wait_http(urls[{"victoria-metrics": "vm", "prometheus-receiver": "prom", "vmagent": "vmagent",
                                 "device-prometheus": "device"}[proc.name]] + ready, 60)
        print(f"ingesting from {ns.devices} devices for {ns.minutes:g} min ...", flush=True)
        time.sleep(60)  # warm-up: series created, first blocks flushed
        c0 = {k: cpu_seconds(p) for k, p in (("vm", vm), ("prom", prom))}
        rows0 = metric(urls["vm"], "vm_rows_inserted_total")
        sent0 = metric(urls["vmagent"], "vmagent_remotewrite_bytes_sent_total") / 2
        wal0 = du(os.path.join(work, "device", "wal"))
        t0 = time.time()
        time.sleep(ns.minutes * 60)
        elapsed = time.time() - t0
        wal = du(os.path.join(work, "device", "wal")) - wal0
        scraped = scalar(urls["device"], "sum(scrape_samples_scraped)") + scalar(urls["device"], "count({__name__=~\"instance.*:.*\"})")
        rows = metric(urls["vm"], "vm_rows_inserted_total") - rows0
        sent = metric(urls["vmagent"], "vmagent_remotewrite_bytes_sent_total") / 2 - sent0
        series = scalar(urls["vm"], 'count({__name__=~".+", device=~"sim-bench-.*"})')
        out = {"cpu": cpu_model(), "date": datetime.date.today().isoformat(),
               "devices": ns.devices, "series_per_device": series / ns.devices,
               "samples_per_s_per_device_at_30s": series / ns.devices / PROD_INTERVAL_S,
               "uplink_bytes_per_sample": sent / rows if rows else None}
        out["uplink_bytes_per_device_per_day_at_30s"] = out["uplink_bytes_per_sample"] * series / ns.devices * 2880
        for key, proc, data in (("vm", vm, "vm"), ("prom", prom, "prom")):
            out[f"{key}_rss_mb"] = rss(proc) / 2 ** 20
            out[f"{key}_disk_mb"] = du(os.path.join(work, data)) / 2 ** 20
            out[f"{key}_cpu_us_per_sample"] = (cpu_seconds(proc) - c0[key]) / rows * 1e6
        out["ingest_samples_per_s"] = rows / elapsed
        # the device's WAL: everything scraped and recorded, per device-hour at 30 s scrapes
        out["device_wal_bytes_per_sample"] = wal / (scraped / INTERVAL_S * elapsed) if scraped else None
        out["device_wal_bytes_per_device_hour_at_30s"] = wal / ns.devices / elapsed * 3600 * INTERVAL_S / PROD_INTERVAL_S
        # -- late samples: a new series with samples 30 min, 3 h and 30 h old, through vmagent to both
        now_ms = int(time.time() * 1000)
        ages = {"30m": 1800, "3h": 3 * 3600, "30h": 30 * 3600}
        for age, seconds in ages.items():  # one write each: a receiver refuses a whole write for one bad sample
            body = f'edgechat_bench_late{{age="{age}"}} 1 {now_ms - seconds * 1000}\n'
            urllib.request.urlopen(urllib.request.Request(f"{urls['vmagent']}/api/v1/import/prometheus",  # noqa: S310
                                                          data=body.encode()), timeout=10)
            time.sleep(5)
        time.sleep(10)
        for key in ("vm", "prom"):
            kept = get(f"{urls[key]}/api/v1/query", {"query": "count_over_time(edgechat_bench_late[31h])"})
            out[f"{key}_late_kept"] = sorted(r["metric"]["age"] for r in kept["data"]["result"])
        # -- outage of both stores
        print(f"both stores down for {ns.outage_minutes:g} min ...", flush=True)
        stopped = time.time()
        q0 = du(os.path.join(work, "vmagent"))
        vm.stop()
        prom.stop()
        time.sleep(ns.outage_minutes * 60)
        queue = du(os.path.join(work, "vmagent")) - q0
        outage = time.time() - stopped
        out["vmagent_queue_bytes_per_device_hour_at_30s"] = (queue / 2 / ns.devices / outage * 3600
                                                             * INTERVAL_S / PROD_INTERVAL_S)
        vm.start()
        prom.start()
        vm.wait_http(urls["vm"] + "/health", 60)
        prom.wait_http(urls["prom"] + "/-/ready", 60)
        back = time.time()
        time.sleep(120)  # vmagent's retry backoff reaches a minute
        window = f"[{int(back - stopped + 20)}s]"
        probe = f'count_over_time(up{{device="{specs[0].name}"}}{window})'
        at = {"time": f"{back + 10:.3f}"}
        local = get(f"{urls['device']}/api/v1/query", {"query": probe, **at})["data"]["result"]
        out["outage_s"] = outage
        out["device_samples_in_outage_window"] = float(local[0]["value"][1]) if local else 0
        for key in ("vm", "prom"):
            got = get(f"{urls[key]}/api/v1/query", {"query": probe, **at})["data"]["result"]
            out[f"{key}_samples_in_outage_window"] = float(got[0]["value"][1]) if got else 0
        print(json.dumps(out, indent=2))
        return 0
    finally:
        for proc in reversed(procs):
            proc.stop()
        shutil.rmtree(work, ignore_errors=True)


def cpu_model() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "?")


if __name__ == "__main__":
    sys.exit(main())
