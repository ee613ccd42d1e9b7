"""Reading metric samples: from an exposition text (a /metrics body) or straight from a registry."""
from __future__ import annotations

from typing import Callable, Iterable

import requests
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample


def fetch_metrics(url: str) -> str:
    """GET url/metrics; the body."""
    return requests.get(url + "/metrics", timeout=10).text


def _samples(source) -> Iterable[Sample]:
    """Samples of an exposition text (str or bytes), a running server's base URL ("http://...", its
    /metrics is fetched), a CollectorRegistry, or anything with a `.registry` (telemetry's Metrics)."""
    if isinstance(source, bytes):
        source = source.decode()
    if isinstance(source, str) and source.startswith(("http://", "https://")):
        source = fetch_metrics(source)
    if isinstance(source, str):
        families = text_string_to_metric_families(source)
    else:
        families = getattr(source, "registry", source).collect()
    for family in families:
        yield from family.samples


def samples(source) -> dict[tuple, float]:
    """{(sample name, sorted labels): value} of every sample."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for s in _samples(source)}


def series_of(source, name: str) -> dict[tuple, float]:
    """Every sample of one name: {sorted labels: value}."""
    return {labels: v for (n, labels), v in samples(source).items() if n == name}


_MISSING = object()


def metric_value(source, name: str, *, combine: Callable[[Iterable[float]], float] | None = None,
                 default=_MISSING, **labels: str) -> float:
    """One sample's value, from an exposition text, a server's URL or a registry (see _samples).

    Without `combine`, the sample with exactly these labels. With `combine` (sum, max), that
    function of every sample of this name whose labels include these: the series of a real
    daemon's scrape can carry more labels (a pid per worker) than a test names. When nothing
    matches: `default` if given, else KeyError.
    """
    if combine is None:
        wanted = tuple(sorted(labels.items()))
        found = [s.value for s in _samples(source)
                 if s.name == name and tuple(sorted(s.labels.items())) == wanted]
    else:
        found = [s.value for s in _samples(source)
                 if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]
    if found:
        return found[-1] if combine is None else combine(found)
    if default is _MISSING:
        raise KeyError((name, labels))
    return default
