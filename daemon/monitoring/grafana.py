"""Grafana JSON building blocks, so every edgechat dashboard follows dashboard-linter's rules by construction."""

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
SCHEMA_VERSION = 39
TAGS = ["edgechat"]
_MATCHERS = 'job=~"$job", instance=~"$instance"'
_GRID_WIDTH = 24


def sel(metric, extra=""):
    """Return a selector filtered by the job and instance variables (the linter's target-job/instance rules)."""
    matchers = f"{_MATCHERS}, {extra}" if extra else _MATCHERS
    return f"{metric}{{{matchers}}}"


def rate(metric, extra="", fn="rate"):
    """Return `fn(metric{...}[$__rate_interval])`: counters only ever appear inside rate or increase."""
    return f"{fn}({sel(metric, extra)}[$__rate_interval])"


def quantile(q, histogram, by=(), extra=""):
    """Return the q-quantile of a histogram per instance (and `by` labels) over $__rate_interval."""
    labels = ", ".join(["instance", *by, "le"])
    return f"histogram_quantile({q}, sum by ({labels}) ({rate(histogram + '_bucket', extra)}))"


def target(expr, legend="", instant=False, fmt="time_series"):
    """Return a Prometheus query target; refIds are filled in by the panel."""
    return {
        "datasource": DATASOURCE,
        "editorMode": "code",
        "expr": expr,
        "format": fmt,
        "instant": instant,
        "legendFormat": legend or "__auto",
        "range": not instant,
    }


def _thresholds(steps):
    """Turn [(value_or_None, colour), ...] into Grafana's absolute threshold steps."""
    return {"mode": "absolute", "steps": [{"color": c, "value": v} for v, c in steps]}


def _panel(kind, title, description, unit, targets, w, h, *, defaults=None, options=None, overrides=()):
    """Return a panel with the templated datasource, a description and a unit (the linter's panel rules)."""
    for ref, t in zip("ABCDEFGH", targets):
        t["refId"] = ref
    field_defaults = {"unit": unit}
    field_defaults.update(defaults or {})
    return {
        "datasource": DATASOURCE,
        "description": description,
        "fieldConfig": {"defaults": field_defaults, "overrides": list(overrides)},
        "gridPos": {"h": h, "w": w},
        "options": options or {},
        "targets": list(targets),
        "title": title,
        "type": kind,
    }


def timeseries(title, description, unit, targets, w=12, h=8, overrides=(), minimum=None, steps=None):
    """Return a line-chart panel; `steps` draws fixed thresholds as dashed lines."""
    custom = {"drawStyle": "line", "fillOpacity": 10, "lineWidth": 1, "showPoints": "never",
              "spanNulls": False, "thresholdsStyle": {"mode": "dashed" if steps else "off"}}
    defaults = {"color": {"mode": "palette-classic"}, "custom": custom,
                "thresholds": _thresholds(steps or [(None, "green")])}
    if minimum is not None:
        defaults["min"] = minimum
    options = {"legend": {"calcs": ["lastNotNull", "max"], "displayMode": "table", "placement": "bottom",
                          "showLegend": True},
               "tooltip": {"mode": "multi", "sort": "desc"}}
    return _panel("timeseries", title, description, unit, targets, w, h,
                  defaults=defaults, options=options, overrides=overrides)


def stat(title, description, unit, targets, steps, w=4, h=5, mappings=(), text_mode="auto", decimals=None):
    """Return a single-value panel coloured by `steps`, showing the last value in the time range."""
    defaults = {"color": {"mode": "thresholds"}, "mappings": list(mappings), "thresholds": _thresholds(steps)}
    if decimals is not None:
        defaults["decimals"] = decimals
    options = {"colorMode": "background" if text_mode != "name" else "none", "graphMode": "none",
               "justifyMode": "auto", "orientation": "auto", "textMode": text_mode,
               "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}}
    return _panel("stat", title, description, unit, targets, w, h, defaults=defaults, options=options)


def gauge(title, description, unit, targets, steps, w=4, h=5):
    """Return a gauge from 0 to 1 coloured by `steps` (for ratios of a limit)."""
    defaults = {"color": {"mode": "thresholds"}, "max": 1, "min": 0, "thresholds": _thresholds(steps)}
    options = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
               "showThresholdLabels": False, "showThresholdMarkers": True}
    return _panel("gauge", title, description, unit, targets, w, h, defaults=defaults, options=options)


def table(title, description, unit, targets, hidden, w=12, h=6, no_value=""):
    """Return a table of an instant query's labels, hiding the `hidden` columns."""
    defaults = {"custom": {"align": "auto", "cellOptions": {"type": "auto"}}, "noValue": no_value,
                "thresholds": _thresholds([(None, "green")])}
    panel = _panel("table", title, description, unit, targets, w, h, defaults=defaults,
                   options={"cellHeight": "sm", "showHeader": True})
    panel["transformations"] = [{"id": "organize", "options": {"excludeByName": {k: True for k in hidden}}}]
    return panel


def heatmap(title, description, unit, targets, w=24, h=9):
    """Return a heatmap of pre-bucketed histogram data (`format: heatmap` targets)."""
    options = {"calculate": False, "cellGap": 1, "color": {"mode": "scheme", "scheme": "Oranges", "steps": 64},
               "legend": {"show": True}, "rowsFrame": {"layout": "auto"},
               "tooltip": {"mode": "single", "yHistogram": True}, "yAxis": {"axisPlacement": "left", "unit": unit}}
    return _panel("heatmap", title, description, unit, targets, w, h, options=options)


def red_dashed(name_regex):
    """Return an override drawing the series whose name matches as a red dashed line without fill."""
    return {"matcher": {"id": "byRegexp", "options": name_regex},
            "properties": [{"id": "color", "value": {"fixedColor": "red", "mode": "fixed"}},
                           {"id": "custom.lineStyle", "value": {"dash": [10, 10], "fill": "dash"}},
                           {"id": "custom.fillOpacity", "value": 0},
                           {"id": "custom.lineWidth", "value": 2}]}


def row(title):
    """Return a (never collapsed) row header."""
    return {"collapsed": False, "gridPos": {"h": 1, "w": _GRID_WIDTH}, "panels": [], "title": title, "type": "row"}


def layout(panels):
    """Give panels ids and flow them left to right, top to bottom in Grafana's 24-column grid."""
    x = y = row_height = 0
    for panel_id, panel in enumerate(panels, start=1):
        pos = panel["gridPos"]
        if panel["type"] == "row" or x + pos["w"] > _GRID_WIDTH:
            x, y, row_height = 0, y + row_height, 0
        pos["x"], pos["y"] = x, y
        panel["id"] = panel_id
        x, row_height = x + pos["w"], max(row_height, pos["h"])
    return panels


def _query_variable(name, query):
    """Return a multi-select query variable refreshed on time-range change, as the linter requires."""
    return {"allValue": ".+", "current": {}, "datasource": DATASOURCE, "definition": query, "hide": 0,
            "includeAll": True, "label": name.title(), "multi": True, "name": name, "options": [],
            "query": query, "refresh": 2, "regex": "", "skipUrlSync": False, "sort": 1, "type": "query"}


def variables():
    """Return the templating list: the Prometheus datasource, then job and instance."""
    datasource = {"current": {}, "hide": 0, "includeAll": False, "label": "Data source", "multi": False,
                  "name": "datasource", "options": [], "query": "prometheus", "refresh": 1, "regex": "",
                  "skipUrlSync": False, "type": "datasource"}
    return [datasource,
            _query_variable("job", "label_values(edgechat_build_info, job)"),
            _query_variable("instance", 'label_values(edgechat_build_info{job=~"$job"}, instance)')]


def annotation(name, expr, title, text, colour, tag_keys, value_is_time=False):
    """Return a Prometheus annotation; with value_is_time the series value (ms) is the event's time."""
    return {"datasource": DATASOURCE, "enable": True, "expr": expr, "hide": False, "iconColor": colour,
            "name": name, "step": "1m", "tagKeys": tag_keys, "textFormat": text, "titleFormat": title,
            "useValueForTime": value_is_time}


def _builtin_annotation():
    """Return Grafana's own annotations-and-alerts entry that every dashboard carries."""
    return {"builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"}, "enable": True,
            "hide": True, "iconColor": "rgba(0, 211, 255, 1)", "name": "Annotations & Alerts",
            "type": "dashboard"}


def dashboard(uid, title, description, panels, annotations, links):
    """Return a complete, non-editable dashboard (stable uid, tags, current schemaVersion)."""
    return {
        "annotations": {"list": [_builtin_annotation(), *annotations]},
        "description": description,
        "editable": False,
        "fiscalYearStartMonth": 0,
        "graphTooltip": 1,
        "id": None,
        "links": [{"asDropdown": False, "icon": "dashboard", "includeVars": True, "keepTime": True,
                   "tags": [], "targetBlank": False, "title": link_title, "tooltip": "",
                   "type": "link", "url": f"/d/{link_uid}"} for link_uid, link_title in links],
        "liveNow": False,
        "panels": layout(panels),
        "refresh": "1m",
        "schemaVersion": SCHEMA_VERSION,
        "tags": list(TAGS),
        "templating": {"list": variables()},
        "time": {"from": "now-6h", "to": "now"},
        "timepicker": {},
        "timezone": "",
        "title": title,
        "uid": uid,
        "version": 1,
        "weekStart": "",
    }
