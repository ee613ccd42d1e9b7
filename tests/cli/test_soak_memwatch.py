"""`edgechat memwatch` on real growing and flat processes; `edgechat soak` against a real daemon; reports."""
from __future__ import annotations

import csv
import subprocess
import sys

import pytest

from daemon.cli import soak_report
from daemon.cli.memsample import parse_metrics, slope_per_minute
from support.processes import track
from support.servers import Daemon

GROW = ("import time\nheld = []\nprint('ready', flush=True)\nwhile True:\n"
        "    held.append(bytearray(b'x' * (4 << 20)))\n    time.sleep(0.05)\n")
FLAT = "import time\nprint('ready', flush=True)\ntime.sleep(120)\n"


@pytest.fixture
def child():
    """Start a python child running `code`; killed after the test."""
    procs = []

    def start(code: str) -> subprocess.Popen:
        proc = track(subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True))
        assert proc.stdout.readline().strip() == "ready"
        procs.append(proc)
        return proc
    yield start
    for proc in procs:
        proc.kill()
        proc.wait(10)


def test_slope_is_least_squares_in_units_per_minute():
    assert slope_per_minute([(0, 100), (30, 105), (60, 110)]) == pytest.approx(10.0)
    # a sawtooth around a flat level has no trend
    assert slope_per_minute([(t, 100 + (5 if t % 2 else -5)) for t in range(0, 120)]) == pytest.approx(0, abs=0.2)
    assert slope_per_minute([(0, 1)]) is None


def test_parse_metrics_reads_labelled_samples():
    text = ('# HELP x y\n# TYPE edgechat_process_resident_memory_bytes gauge\n'
            'edgechat_process_resident_memory_bytes{pid="12"} 1.5e+08\n'
            'edgechat_process_resident_memory_bytes{pid="13"} 5e+07\nedgechat_sessions 3.0\n')
    parsed = parse_metrics(text)
    assert parsed["edgechat_process_resident_memory_bytes"] == [({"pid": "12"}, 1.5e8), ({"pid": "13"}, 5e7)]
    assert parsed["edgechat_sessions"] == [({}, 3.0)]


def test_memwatch_exits_3_on_a_growing_process(runner, child):
    proc = child(GROW)
    code, out, err = runner("memwatch", "--pid", str(proc.pid), "--interval", "0.2", "--window", "1.5",
                            "--duration", "30", "--threshold-mb-per-min", "200")
    assert code == 3, out + err
    assert "above the threshold" in err
    assert out.splitlines()[0].split() == ["time", "rss_mb", "uss_mb", "vms_mb", "slope_mb_per_min"]


def test_memwatch_exits_0_on_a_flat_process(runner, child):
    proc = child(FLAT)
    code, out, err = runner("memwatch", "--pid", str(proc.pid), "--interval", "0.2", "--window", "1",
                            "--duration", "2.5", "--threshold-mb-per-min", "200")
    assert code == 0, out + err
    samples = out.splitlines()[1:]
    assert len(samples) >= 5 and "(filling)" not in samples[-1]


def test_memwatch_exits_4_when_the_process_is_gone(runner, child):
    proc = child(FLAT)
    proc.kill()
    proc.wait(10)
    code, _, err = runner("memwatch", "--pid", str(proc.pid), "--interval", "0.2", "--duration", "1")
    assert code == 4 and f"no process {proc.pid}" in err


def test_client_commands_import_no_torch():
    code = ("import sys; import daemon.cli.soak, daemon.cli.memwatch, daemon.cli.stack; "
            "from daemon.cli import build_parser; build_parser(); "
            "bad = [m for m in ('torch', 'transformers', 'daemon.model.engine', 'prometheus_client') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:  # optional extra `soak`
        return False
    return True


def _rows(path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_soak_against_real_daemons_writes_csv_table_and_plot(tmp_path, cache_dir, runner):
    serve = ("--max-new-tokens", "16", "--no-warmup")
    (tmp_path / "default").mkdir()
    (tmp_path / "leak").mkdir()
    with Daemon(tmp_path / "default", cache_dir, *serve) as d, \
            Daemon(tmp_path / "leak", cache_dir, *serve, "--leak-mode", "history") as leak:
        code, out, err = runner("soak", "--url", d.url, "--turns", "6", "--sessions", "2", "--max-tokens", "8",
                                "--csv", str(tmp_path / "default.csv"), "--table", str(tmp_path / "t.md"))
        assert code == 0, err
        # by pid: the gunicorn master and its worker, sampled with psutil
        code, _, err = runner("soak", "--url", d.url, "--turns", "2", "--pid", str(d.proc.pid),
                              "--csv", str(tmp_path / "pid.csv"))
        assert code == 0, err
        # two daemons interleaved turn by turn, next to the earlier run
        png = ["--png", str(tmp_path / "soak.png")] if _has_matplotlib() else []
        code, both, err = runner("soak", "--url", d.url, "--url", leak.url, "--turns", "8", "--max-tokens", "8",
                                 "--csv", str(tmp_path / "pair.csv"), "--compare", str(tmp_path / "default.csv"),
                                 *png)
        assert code == 0, err
    rows = _rows(tmp_path / "default.csv")
    assert [int(r["turn"]) for r in rows] == list(range(7))
    assert {r["outcome"] for r in rows[1:]} == {"ok"} and rows[0]["outcome"] == "initial"
    assert all(int(r["rss_bytes"]) > 50 << 20 for r in rows)
    assert [int(r["session"]) for r in rows[1:]] == [1, 2, 1, 2, 1, 2]
    # bounded history: each session's prompt grows while it is under the 5-turn limit
    s1 = [int(r["prompt_tokens"]) for r in rows[1:] if r["session"] == "1"]
    assert s1 == sorted(s1) and s1[0] < s1[-1]
    table = (tmp_path / "t.md").read_text()
    assert table == out and table.startswith("| measure | default |")
    assert "| crashed or degraded (limit " in table and "| no |" in table
    pid_rows = _rows(tmp_path / "pid.csv")
    assert len(pid_rows[0]["pids"].split(";")) == 2  # master + one worker

    assert both.startswith("| measure | default | default | leak_mode=history |")
    bounded, leaking = _rows(tmp_path / "pair-1.csv"), _rows(tmp_path / "pair-2.csv")
    kept = [int(r["history_messages"]) for r in bounded[1:]]
    assert kept[:5] == [2, 4, 6, 8, 10] and max(kept) <= 10  # trimmed to at most 5 turns
    assert [int(r["history_messages"]) for r in leaking[1:]] == [2 * t for t in range(1, 9)]
    if png:
        assert (tmp_path / "soak.png").read_bytes()[:4] == b"\x89PNG"


def _write(path, rows: list[dict]) -> str:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=soak_report.FIELDS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in soak_report.FIELDS})
    return str(path)


def _synthetic(label: str, turns: int, latency, rss, pids=lambda t: "100", outcome=lambda t: "ok") -> list[dict]:
    return [{"label": label, "turn": t, "session": 1 if t else 0, "session_turn": t,
             "outcome": outcome(t) if t else "initial", "latency_s": latency(t) if t else "",
             "prompt_tokens": 40 * t if t else "", "rss_bytes": rss(t), "limit_bytes": 2 << 30,
             "pids": pids(t)} for t in range(turns + 1)]


def test_report_table_is_shaped_like_the_seed_article(tmp_path, runner):
    a = _write(tmp_path / "a.csv", _synthetic("default", 30, lambda t: 1.0 + t / 100, lambda t: (980 + t) << 20))
    b = _write(tmp_path / "b.csv", _synthetic("leak", 30, lambda t: 0.4 * t, lambda t: (980 + 40 * t) << 20,
                                              pids=lambda t: "100" if t < 25 else "200"))
    c = _write(tmp_path / "c.csv", _synthetic("busy", 10, lambda t: 1.0, lambda t: 900 << 20,
                                              outcome=lambda t: "rejected" if t == 4 else "ok"))
    code, out, err = runner("soak-report", a, b, c, "--table", str(tmp_path / "t.md"))
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "| measure | default | leak | busy |"
    assert lines[2] == "| initial memory (RSS) | 980 MB | 980 MB | 900 MB |"
    assert lines[3] == "| memory after 30 turns | 1010 MB | 2.13 GB | 900 MB (after 10) |"
    assert lines[5] == "| mean latency at turn 20 | 1.20 s | 8.00 s | n/a |"
    assert lines[-1] == ("| crashed or degraded (limit 2.00 GB) | no | crashed at turn 25 (worker restarted) "
                         "| degraded: 1 turn(s) rejected or failed |")


def test_plot_needs_matplotlib_and_says_so(tmp_path, runner, monkeypatch):
    a = _write(tmp_path / "a.csv", _synthetic("default", 3, lambda t: 1.0, lambda t: 900 << 20))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    code, _, err = runner("soak-report", a, "--png", str(tmp_path / "p.png"))
    assert code == 2 and "pip install 'edgechat[soak]'" in err
    assert not (tmp_path / "p.png").exists()


def test_plot_writes_a_png_with_both_runs(tmp_path, runner):
    pytest.importorskip("matplotlib")
    a = _write(tmp_path / "a.csv", _synthetic("default", 5, lambda t: 1.0, lambda t: 900 << 20))
    b = _write(tmp_path / "b.csv", _synthetic("leak", 5, lambda t: t, lambda t: (900 + 50 * t) << 20))
    code, _, err = runner("soak-report", a, b, "--png", str(tmp_path / "p.png"))
    assert code == 0, err
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
