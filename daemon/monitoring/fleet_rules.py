"""Fleet rules on the central side: cohort leaks and silent devices (vmalert), the store's own health (watcher)."""
from __future__ import annotations

import os

from .alerting import alert_rule
from .promql import Group, Rule, duration, number
from .rules import rule_file, write_files
from .thresholds import Thresholds

# Where the committed, unscaled files live, relative to the repository root.
FLEET_DIR = os.path.join("prometheus", "fleet")
FLEET_FILE = "edgechat-fleet.yml"      # vmalert, against the central store
CENTRAL_FILE = "edgechat-central.yml"  # the watcher Prometheus, which scrapes the central components
# The operator's list of devices that should report (docs/fleet.md): one series per device.
EXPECTED_METRIC = "edgechat_fleet_expected_device"
DEVICES = "version:edgechat_devices:count"
LEAKING = "version:edgechat_leaking_devices:count"
LEAKING_RATIO = "version:edgechat_leaking_devices:ratio"
DEVICE = "{{ $labels.device }}"


def _rec(name: str, expr: str, comment: str) -> Rule:
    return Rule(comment, {"record": name, "expr": expr})


def _versions(window: str) -> str:
    """Each device's version as its daemon reports it (edgechat_build_info), over `window`."""
    return f"max by (device, version) (last_over_time(edgechat_build_info[{window}]))"


def fleet_groups(t: Thresholds) -> list[Group]:
    """vmalert's groups: the cohort count (recording), then the cohort and silent-device alerts."""
    window = duration(t.cohort_window)
    leaked = (f'max by (device) (max_over_time(ALERTS{{alertname=~"{t.fleet_leak_alerts_regex}", '
              f'alertstate="firing"}}[{window}]))')
    recording = Group("edgechat.fleet.recording", [
        _rec(DEVICES, f"count by (version) ({_versions(window)})",
             f"Devices that reported each version within {window}."),
        _rec(LEAKING, f"count by (version) (\n  {leaked}\n  * on (device) group_left (version)\n"
                      f"  {_versions(window)}\n)",
             f"Devices of each version on which a leak alert fired within {window}."),
        _rec(LEAKING_RATIO, f"{LEAKING} / on (version) {DEVICES}", "Share of each version's devices that leak."),
    ])
    silent_window = duration(t.device_silent_window)
    alerts = Group("edgechat.fleet.alerts", [
        alert_rule(t, "EdgechatCohortLeaking",
                   f"Detects a release that leaks: at least {t.cohort_ratio:.0%} (and {t.cohort_min_devices}) of "
                   f"the devices running one version had a leak alert within {window}. Pages once per version; "
                   "Alertmanager holds back that version's device-level leak alerts meanwhile.",
                   f"{LEAKING_RATIO} >= {number(t.cohort_ratio)}\n"
                   f"and on (version) {LEAKING} >= {t.cohort_min_devices}",
                   t.cohort_for, "critical",
                   "edgechat {{ $labels.version }} leaks on many devices.",
                   "{{ $value | humanizePercentage }} of the devices running edgechat {{ $labels.version }} "
                   f"had a memory or history leak alert within the last {window}: a release problem, not a "
                   "device problem."),
        alert_rule(t, "EdgechatDeviceSilent",
                   f"Detects a device on the expected-devices list from which no sample arrived for "
                   f"{silent_window} (the device, its Prometheus or its uplink is gone).",
                   f"max by (device, site) ({EXPECTED_METRIC})\n"
                   f"unless on (device)\n"
                   f'count by (device) (count_over_time(up{{job="{t.job}"}}[{silent_window}]))',
                   t.device_silent_for, "warning",
                   "An edgechat device stopped reporting.",
                   f"{DEVICE} (site {{{{ $labels.site }}}}) is on the expected-devices list (value "
                   f"{{{{ $value }}}}) but the central store received nothing from it for {silent_window}. "
                   "Its own Prometheus still alerts locally if it runs; remove a decommissioned device "
                   "from the list."),
    ])
    return [recording, alerts]


def central_groups(t: Thresholds) -> list[Group]:
    """The watcher's groups: the central store and the fleet rule evaluator, scraped directly."""
    def down(name: str, job: str, what: str, severity: str, keep_firing: float, consequence: str) -> Rule:
        selector = f'up{{job="{job}"}}'
        window = duration(t.store_down_for)
        # no successful scrape over the whole window: one slow scrape of a busy store is not an outage
        return alert_rule(
            t, name, f"Detects {what} the watcher could not scrape once in {window} (or has no target for).",
            f"max_over_time({selector}[{window}]) == 0 or absent({selector})", t.store_down_for, severity,
            f"The fleet's {what} is down.",
            f"The watcher has had no successful scrape of the {what} for {duration(t.store_down_for)} "
            f"(value {{{{ $value }}}}: 0 = down, 1 = no target). " + consequence, keep_firing)
    return [Group("edgechat.central.alerts", [
        down("EdgechatCentralStoreDown", t.central_store_job, "central store", "critical", t.store_down_keep_firing,
             "Devices buffer their samples meanwhile and device alerts still reach Alertmanager; "
             f"EdgechatDeviceSilent is held back until {duration(t.store_down_keep_firing)} after it returns."),
        down("EdgechatFleetRulesDown", t.fleet_rules_job, "rule evaluator (vmalert)", "warning", 0,
             "Cohort and silent-device alerts are not evaluated; device alerts are unaffected."),
    ])]


def render(time_scale: float = 1.0, thresholds: Thresholds | None = None) -> dict[str, str]:
    """Map each central rule file name to its YAML text; time_scale < 1 shrinks every window and `for`."""
    t = (thresholds or Thresholds()).scaled(time_scale)
    return {FLEET_FILE: rule_file(fleet_groups(t), "fleet rules (vmalert on the central store)", time_scale),
            CENTRAL_FILE: rule_file(central_groups(t), "central health rules (watcher Prometheus)", time_scale)}


def write(directory: str, time_scale: float = 1.0, thresholds: Thresholds | None = None) -> list[str]:
    """Render into `directory` (created if needed) and return the paths written."""
    return write_files(directory, render(time_scale, thresholds))
