"""End to end on a simulated fleet (one per module): 3 real daemons + 50 simulated devices, device-side
Prometheus servers evaluating the shipped rules (time scale 0.05), vmagents buffering to VictoriaMetrics,
vmalert with the fleet rules, two clustered Alertmanagers, TLS and basic auth on every uplink.

The tests run in file order on one timeline: the central store is stopped at the start and the leaking
daemon's alert uplink is cut; the alert fires on the device, is delivered once the uplink is back while
the store is still down, then the store returns with no gap in the devices' series; one Alertmanager is
killed and later notifications (the cohort page, a silent device) still arrive exactly once.
"""
from __future__ import annotations

import time

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from daemon.fleet.topology import LEAKY_VERSION, STEADY_VERSION
from daemon.monitoring.shipping import SERIES_BUDGET
from support.fleet import LEAKER, TIME_SCALE, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.fleet, pytest.mark.timeout(600)]

HISTORY = "EdgechatHistoryUnbounded"
STORE_OUTAGE_S = 80           # 27 min nominal: longer than the silent-device window, so only the
                              # store-down inhibition keeps every device from looking silent
NOTIFY_S = 90                 # firing -> webhook (warning group_wait 30 s, resend every 3 s)


def _families(url: str) -> dict[str, str]:
    text = requests.get(url + "/metrics", timeout=10).text
    return {f.name: f.type for f in text_string_to_metric_families(text)}


def _registry_families() -> dict[str, str]:
    from prometheus_client import CollectorRegistry
    from daemon.telemetry.metrics import Metrics
    return {f.name: f.type for f in Metrics(CollectorRegistry(), multiprocess=False).registry.collect()}


def _sim(run, shape: str, version: str | None = None):
    return next(s for s in run.layout.sims if s.shape == shape and (version is None or s.version == version))


def test_simulated_devices_expose_the_daemons_metric_families(fleet_run):
    real = {n: k for n, k in _families(fleet_run.station("real-2").url).items() if n.startswith("edgechat_")}
    sim = {n: k for n, k in _families(fleet_run.fleet.sim_url(_sim(fleet_run, "healthy").name)).items()
           if n.startswith("edgechat_")}
    defined = {n: k for n, k in _registry_families().items() if n.startswith("edgechat_")}
    assert len(real) > 40
    assert sim == defined, "a simulated device exposes every family the daemon defines, with its type"
    # the real daemon exposes the same, except families its object census fills at most every 2 min
    assert {n: k for n, k in sim.items() if n in real} == real
    assert set(sim) - set(real) <= {"edgechat_live_objects", "edgechat_torch_tensor_bytes"}


def test_real_daemon_exports_anonymous_memory_and_swap(fleet_run):
    text = requests.get(fleet_run.station("real-2").url + "/metrics", timeout=10).text
    samples = {s.name: s for f in text_string_to_metric_families(text) for s in f.samples}
    anon, swap = samples["edgechat_process_anonymous_memory_bytes"], samples["edgechat_process_swap_bytes"]
    assert "pid" in anon.labels and anon.value > 10 * 2 ** 20 and swap.value >= 0
    assert anon.value <= samples["edgechat_process_resident_memory_bytes"].value


def test_leak_alert_fires_offline_and_arrives_once_uplink_returns_while_store_is_down(fleet_run):
    run, fleet = fleet_run, fleet_run.fleet
    station = run.station(LEAKER)
    outage_probe = _sim(run, "healthy", LEAKY_VERSION).name
    for device in (LEAKER, outage_probe):  # samples flow to the store before it goes away
        wait_until(lambda: fleet.central_samples(f'up{{device="{device}"}}', time.time() - 5, time.time()), 60,
                   f"{device}'s samples reaching the store")
    station.cut_alert_uplink()
    run.marks["store_stopped"] = time.time()
    fleet.central.store.stop()
    for _ in range(7):  # > 11 messages in one conversation under max_history_turns=5
        run.leak_turn()
    fired = wait_until(lambda: run.local_alerts(LEAKER, HISTORY), 120, "HistoryUnbounded firing on the device",
                       every=2)
    assert fired[0]["metric"]["severity"] == "warning"
    time.sleep(3 * 60 * TIME_SCALE)  # several re-sends that cannot get through
    for i in (0, 1):
        held = [a for a in fleet.alertmanager_alerts(i) if a["labels"].get("device") == LEAKER
                and a["labels"]["alertname"] == HISTORY]
        assert held == [], f"alertmanager-{i} got the alert through a cut uplink"
    station.restore_alert_uplink()
    wait_until(lambda: run.notifications(HISTORY, device=LEAKER), NOTIFY_S, "the leak notification")
    [notification] = run.notifications(HISTORY, device=LEAKER)
    [alert] = [a for a in notification["alerts"] if a["labels"].get("device") == LEAKER]
    assert alert["labels"]["site"] == "north" and alert["labels"]["model"] == "builtin:tiny"
    assert notification["receiver"] == "webhook-warning"
    assert not fleet.central.store.alive(), "the alert must have arrived while the store was down"


def test_central_store_returns_after_its_outage(fleet_run):
    run, fleet = fleet_run, fleet_run.fleet
    time.sleep(max(0.0, run.marks["store_stopped"] + STORE_OUTAGE_S - time.time()))
    fleet.central.start_store()
    run.marks["store_started"] = time.time()
    # the devices' buffered samples arrive (checked to the sample at the end of the module: vmagent
    # retries a failed block with a backoff of up to a minute)
    wait_until(lambda: fleet.central_query('count(up{job="edgechat"} offset 30s)'), 60, "samples after the outage")


def test_steady_state_exactly_once_then_one_alertmanager_killed(fleet_run):
    run, fleet = fleet_run, fleet_run.fleet
    time.sleep(15)  # both Alertmanagers keep receiving the re-sent alert; the cluster's log dedups
    assert len(run.notifications(HISTORY, device=LEAKER)) == 1
    status = requests.get(f"{fleet.central.am_urls[1]}/api/v2/status", auth=fleet.creds.auth,
                          verify=fleet.creds.ca_file, timeout=10).json()
    assert status["cluster"]["status"] == "ready" and len(status["cluster"]["peers"]) == 2
    fleet.central.alertmanagers[0].kill()
    run.marks["am_killed"] = time.time()


def test_cohort_of_one_version_pages_once_naming_it(fleet_run):
    run = fleet_run
    wait_until(lambda: run.notifications("EdgechatCohortLeaking"), 240, "the cohort page")
    time.sleep(10)
    [page] = run.notifications("EdgechatCohortLeaking")
    [alert] = page["alerts"]
    assert alert["labels"]["version"] == LEAKY_VERSION and page["receiver"] == "webhook-critical"
    assert LEAKY_VERSION in alert["annotations"]["summary"]
    assert not run.notifications("EdgechatCohortLeaking", version=STEADY_VERSION)
    # device-level leak alerts came grouped per cohort: never two versions in one notification
    for n in run.notifications("EdgechatMemoryLeakSuspected"):
        assert len({a["labels"].get("version") for a in n["alerts"]}) == 1
    leakers = [s for s in run.layout.sims if s.version == LEAKY_VERSION and s.shape.startswith("leak")]
    leak_notes = [n for n in run.notifications("EdgechatMemoryLeakSuspected")
                  if n["alerts"][0]["labels"].get("version") == LEAKY_VERSION]
    assert len(leak_notes) <= 2 < len(leakers), "one notification per cohort and severity, not per device"


def test_silent_device_is_noticed_and_decommissioning_it_stops_the_alert(fleet_run):
    run, fleet = fleet_run, fleet_run.fleet
    silent = _sim(run, "silent").name
    # the store-down alert holds EdgechatDeviceSilent back for 90 s after the store returned; going
    # silent 70 s after, the device is noticed (45 s window, 15 s `for`) once that hold has ended
    time.sleep(max(0.0, run.marks["store_started"] + 70 - time.time()))
    fleet.silence(silent)
    try:
        wait_until(lambda: run.notifications("EdgechatDeviceSilent", device=silent), 150,
                   "EdgechatDeviceSilent for the silent device (with one Alertmanager dead)")
    except AssertionError as exc:
        held = [(a["labels"]["alertname"], a["status"]) for a in fleet.alertmanager_alerts(1)
                if a["labels"]["alertname"] in ("EdgechatDeviceSilent", "EdgechatCentralStoreDown")]
        raise AssertionError(f"{exc}; alertmanager-1 holds {held}; store-down notifications "
                             f"{[a['status'] for n in run.notifications('EdgechatCentralStoreDown', status='firing') for a in n['alerts']]}; "
                             f"vmalert {[(a['name'], a['labels'].get('device'), a['state']) for a in fleet.vmalert_alerts()]}") from None
    time.sleep(5)
    assert len(run.notifications("EdgechatDeviceSilent", device=silent)) == 1
    noisy = {a["labels"].get("device") for n in run.notifications("EdgechatDeviceSilent") for a in n["alerts"]}
    assert noisy == {silent}, "no other device looked silent, the store outage included"
    # HA is at-least-once: a kill may cost one duplicate, never a lost notification
    assert 1 <= len(run.notifications(HISTORY, device=LEAKER)) <= 2
    fleet.set_expected([d for d in run.layout.expected() if d[0] != silent])
    wait_until(lambda: not [a for a in fleet.vmalert_alerts() if a["labels"].get("device") == silent], 60,
               "the decommissioned device's alert to end")


def test_swap_hidden_leak_is_caught(fleet_run):
    run = fleet_run
    device = _sim(run, "swap_hidden").name
    station = run.station(device)

    def fired(alertname: str) -> list:  # within the run (the device OOMs and restarts every few minutes)
        return run.fleet.device_query(station, f'max_over_time(ALERTS{{alertname="{alertname}", '
                                               f'alertstate="firing", device="{device}"}}[10m])')
    assert fired("EdgechatMemoryLeakSuspected"), "the swap-hidden leak went unnoticed"
    assert not fired("EdgechatMemoryNearLimit"), "RAM alone stays far from the limit"
    [ram] = run.fleet.device_query(station, f'max_over_time(edgechat_service_memory_bytes{{device="{device}"}}[10m])')
    [swap] = run.fleet.device_query(station, f'max_over_time(edgechat_process_swap_bytes{{device="{device}"}}[10m])')
    assert float(ram["value"][1]) < 0.7 * 2 ** 31 and float(swap["value"][1]) > 300 * 2 ** 20


def test_store_outage_left_no_gap_in_device_series(fleet_run):
    run, fleet = fleet_run, fleet_run.fleet
    stopped, back = run.marks["store_stopped"], run.marks["store_started"]
    start, end = stopped - 2, back + 10   # the whole outage, and the catch-up after it
    for device in (LEAKER, _sim(run, "healthy", LEAKY_VERSION).name):
        station = run.station(device)
        # a real device's Prometheus adds its device label on the way out; a shared one has it on targets
        selector = 'up{job="edgechat"}' if device.startswith("real-") else f'up{{job="edgechat", device="{device}"}}'
        local = [t for t in fleet.device_samples(station, selector, start, end + 2) if start * 1000 <= t <= end * 1000]
        assert len(local) >= (end - start) / 1.5 * 0.8, "the device itself scraped throughout"

        def gap() -> tuple[list, list]:
            series = fleet.central_samples(f'up{{job="edgechat", device="{device}"}}', start, end)
            got = sorted(t for ts in series.values() for t in ts)
            return ([round(t / 1000 - stopped, 1) for t in local if t not in got],
                    [round(t / 1000 - stopped, 1) for t in got if t not in local])
        try:
            wait_until(lambda: gap() == ([], []), 90, "complete series")
        except AssertionError:
            missing, extra = gap()
            raise AssertionError(f"{device}: across a {back - stopped:.0f} s store outage, samples missing at "
                                 f"{missing} s and extra at {extra} s after the store stopped") from None


def test_healthy_devices_raise_nothing_at_warning_or_above(fleet_run):
    run, fleet = fleet_run, fleet_run.fleet
    unhealthy = run.layout.unhealthy()
    seen = set()
    for station in fleet.stations:
        for r in fleet.device_query(station, 'ALERTS{severity=~"warning|critical"}'):
            own = getattr(station, "spec", None)  # a real device's label is added on the way out
            seen.add((r["metric"]["alertname"], r["metric"].get("device") or (own.name if own else "?")))
    for n in run.sink.notifications:
        for a in n["alerts"]:
            if a["labels"].get("severity") in ("warning", "critical") and "device" in a["labels"]:
                seen.add((a["labels"]["alertname"], a["labels"]["device"]))
    assert seen and {device for _, device in seen} <= unhealthy, sorted(seen)
    central = {a["labels"]["alertname"] for n in run.sink.notifications for a in n["alerts"]
               if "device" not in a["labels"] and a["labels"].get("severity") in ("warning", "critical")}
    assert central <= {"EdgechatCohortLeaking", "EdgechatCentralStoreDown"}, central


def test_series_per_device_stay_within_budget(fleet_run):
    counts = {r["metric"]["device"]: int(r["value"][1]) for r in fleet_run.fleet.central_query(
        'count by (device) (last_over_time({__name__=~".+", device!=""}[10m]))')}
    expected = {d for d, _ in fleet_run.layout.expected()}
    assert set(counts) == expected
    assert max(counts.values()) <= SERIES_BUDGET and min(counts.values()) >= 30, counts


def test_uplinks_refuse_plain_and_anonymous_clients(fleet_run):
    c = fleet_run.fleet.central
    try:  # Go's TLS server answers a plain HTTP request with 400, or the connection fails
        plain = requests.get(c.store_url.replace("https", "http") + "/health", timeout=5).status_code
    except requests.exceptions.ConnectionError:
        plain = None
    assert plain in (400, None)
    assert requests.get(f"{c.store_url}/api/v1/query", params={"query": "up"}, verify=fleet_run.fleet.creds.ca_file,
                        timeout=5).status_code == 401
    assert requests.get(f"{c.am_urls[1]}/api/v2/status", verify=fleet_run.fleet.creds.ca_file,
                        timeout=5).status_code == 401


def test_fleet_dashboard_queries_return_data_from_the_central_store(fleet_run):
    from daemon.monitoring import dashboard_fleet
    empty = []
    for title, expr in dashboard_fleet.queries():
        query = expr.replace("$site", ".+").replace("$version", ".+").replace("$device", ".+")
        if not fleet_run.fleet.central_query(query):
            empty.append((title, query))
    assert empty == [], "fleet dashboard queries without data on the central store"
