"""The fleet dashboard, read from the central store: which devices leak, which cohort leaks, who went quiet.

It reads only what devices ship (monitoring/shipping.py: recording-rule outputs and a few raw series)
and what vmalert records there, filtered by the site, version and device variables.
"""

from daemon.monitoring import fleet_rules
from daemon.monitoring.grafana import _panel, _query_variable, _thresholds, dashboard, row, stat, target, timeseries
from daemon.monitoring.recording import names_for
from daemon.monitoring.thresholds import Thresholds

T = Thresholds()
N = names_for(T)
UID = "edgechat-fleet"
TITLE = "edgechat / Fleet"
_F = 'site=~"$site", version=~"$version", device=~"$device"'
SLOPE_MB_MIN = f"max by (device, site, version) ({N.deriv_slow}{{{_F}}}) * 60 / 2^20"
FIRING = f'ALERTS{{alertstate="firing", alertname=~"Edgechat.*", {_F}}}'
UP = f'up{{job="edgechat", {_F}}}'
# devices with a worker decoding per-op without its compiled kernels (EdgechatDecodeSlowPath's condition)
SLOW_DECODE = f"max by (device, version) ({N.decode_slow_path}{{{_F}}}) > 0"


def sel(metric: str, extra: str = "") -> str:
    """A selector filtered by the site, version and device variables."""
    return f"{metric}{{{_F}{', ' + extra if extra else ''}}}"


def variables() -> list[dict]:
    """Data source, then site, version and device (each narrowing the next)."""
    datasource = {"current": {}, "hide": 0, "includeAll": False, "label": "Data source", "multi": False,
                  "name": "datasource", "options": [], "query": "prometheus", "refresh": 1, "regex": "",
                  "skipUrlSync": False, "type": "datasource"}
    return [datasource,
            _query_variable("site", 'label_values(up{job="edgechat"}, site)'),
            _query_variable("version", 'label_values(up{job="edgechat", site=~"$site"}, version)'),
            _query_variable("device", 'label_values(up{job="edgechat", site=~"$site", version=~"$version"}, device)')]


def devices_table() -> dict:
    """One row per device: memory used, slope, history, restarts, version and model, last seen."""
    columns = [
        ("memory % of limit", f"max by (device) ({sel(N.usage_ratio)})"),
        ("slope MB/min", f"max by (device) ({sel(N.deriv_slow)}) * 60 / 2^20"),
        ("history messages", f"max by (device) ({sel(N.history_max)})"),
        ("restarts 24h", f"max by (device) (changes({sel(N.start_time_max)}[1d]))"),
        ("last seen s ago", f"time() - max by (device) (max_over_time(timestamp({UP})[1h:1m]))"),
        ("site / version / model", f"max by (device, site, version, model) ({UP})"),
    ]
    targets = [target(expr, legend, instant=True, fmt="table") for legend, expr in columns]
    defaults = {"custom": {"align": "auto", "cellOptions": {"type": "auto"}}, "noValue": "",
                "thresholds": _thresholds([(None, "green")])}
    panel = _panel("table", "Devices",
                   "Every device that reported in the last hour: memory counted against its limit, the 1 h slope of "
                   "anonymous memory + swap (what the leak alerts watch), the longest conversation, restarts in "
                   "24 h, its cohort and how long ago its last sample arrived. Sort by slope to find leakers.",
                   "none", targets, 24, 10, defaults=defaults, options={"cellHeight": "sm", "showHeader": True})
    renames = {f"Value #{ref}": legend for ref, (legend, _) in zip("ABCDEF", columns)}
    panel["transformations"] = [
        {"id": "merge", "options": {}},
        {"id": "organize", "options": {"excludeByName": {"Time": True, "Value #F": True},
                                       "renameByName": renames}}]
    panel["fieldConfig"]["overrides"] = [
        {"matcher": {"id": "byName", "options": "memory % of limit"},
         "properties": [{"id": "unit", "value": "percentunit"},
                        {"id": "thresholds", "value": _thresholds([(None, "green"), (T.near_limit_warning_ratio, "orange"),
                                                                   (T.near_limit_critical_ratio, "red")])},
                        {"id": "custom.cellOptions", "value": {"type": "color-background"}}]},
        {"matcher": {"id": "byName", "options": "last seen s ago"}, "properties": [{"id": "unit", "value": "s"}]}]
    return panel


def decode_panels() -> list[dict]:
    """How many devices decode on the slow path (no compiled kernels), now and by version over time."""
    return [
        stat("Devices on the slow decode path",
             "Devices with a worker decoding op by op on torch's kernels (about half speed) because the compiled "
             "kernels could not be loaded: a wheel built without them, or an editable checkout without a compiler. "
             "Each one raises EdgechatDecodeSlowPath; 0 is the healthy value.", "none",
             [target(f"count({SLOW_DECODE}) or vector(0)", instant=True)], [(None, "green"), (1, "orange")],
             w=6, h=6),
        timeseries("Devices on the slow decode path by version",
                   "Devices on the slow decode path per version (0 for every version with none): a release whose "
                   "wheel lacks the kernels lifts its whole line at once.", "none",
                   [target(f"count by (version) ({SLOW_DECODE}) or 0 * count by (version) ({UP})", "{{version}}")],
                   w=18, h=6, minimum=0),
    ]


def build() -> dict:
    """Return the fleet dashboard as a dict."""
    window = "1h"
    panels = [
        row("Devices"),
        devices_table(),
        *decode_panels(),
        row("Cohorts"),
        timeseries("Memory slope by cohort",
                   f"Average {window} slope of anonymous memory + swap over the devices of each version and site, "
                   "MB/min. A release that leaks lifts its whole line; one bad device barely moves it.", "none",
                   [target(f"avg by (version, site) ({sel(N.deriv_slow)}) * 60 / 2^20", "{{version}} {{site}}")]),
        timeseries("Share of devices leaking by version",
                   "Devices of each version with a leak alert within the cohort window, as a share of the version's "
                   f"devices (vmalert's recording). EdgechatCohortLeaking pages at {T.cohort_ratio:.0%}.",
                   "percentunit", [target(f'{fleet_rules.LEAKING_RATIO}{{version=~"$version"}}', "{{version}}")],
                   minimum=0, steps=[(None, "green"), (T.cohort_ratio, "red")]),
        timeseries("Top leakers",
                   "The ten devices with the steepest 1 h slope of anonymous memory + swap, MB/min.", "none",
                   [target(f"topk(10, {SLOPE_MB_MIN})", "{{device}} ({{version}})")]),
        timeseries("Devices reporting by version",
                   "Devices whose samples reach the central store, per version. A drop is devices (or an uplink, or "
                   "a site) gone quiet: see EdgechatDeviceSilent.", "none",
                   [target(f"count by (version) ({UP})", "{{version}}")], minimum=0),
        row("Alerts"),
        _panel("table", "Firing fleet alerts",
               "Edgechat* alerts firing now: device alerts (shipped by each device's Prometheus) and the fleet's own "
               "(cohort, silent device, written back by vmalert).", "none",
               [target(FIRING, instant=True, fmt="table")], 24, 8,
               defaults={"custom": {"align": "auto", "cellOptions": {"type": "auto"}}, "noValue": "No alert",
                         "thresholds": _thresholds([(None, "green")])},
               options={"cellHeight": "sm", "showHeader": True}),
    ]
    board = dashboard(UID, TITLE,
                      "The fleet from the central store: devices that leak, cohorts (version, site) that leak, "
                      "devices gone quiet. See docs/fleet.md.", panels, [],
                      [("edgechat-memory", "edgechat / Is it leaking?")])
    board["templating"] = {"list": variables()}
    return board


def queries() -> list[tuple[str, str]]:
    """(panel title, expr) of every target, as Grafana sends them."""
    return [(p["title"], t["expr"]) for p in build()["panels"] for t in p.get("targets", [])]
