"""The CPU-per-I/O benchmark runs end to end against `python3 -m target` (a short run; the real
numbers come from `python3 tests/target/bench_target.py`, see docs/target.md)."""

import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.slow
@pytest.mark.parametrize("args", [[], ["--backend", "null:64M", "--write"], ["--sqflow"]])
def test_bench_runs(args):
    out = subprocess.run([sys.executable, os.path.join(HERE, "bench_target.py"), "--seconds",
                          "0.5", "--json", "--backend", "ram:16M", *args],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["ios"] > 1000 and 0 < res["target_us_per_io"] < 1000


def test_cli_prints_port_and_stops_on_sigterm(tmp_path):
    import signal
    import time
    p = subprocess.Popen([sys.executable, "-m", "target", "--listen", "127.0.0.1:0", "--ns",
                          "ram:1M", "--ns", f"file:{tmp_path / 'd.img'}:4096:1M"],
                         cwd=os.path.dirname(os.path.dirname(HERE)), stdout=subprocess.PIPE,
                         text=True)
    try:
        line = p.stdout.readline()
        assert line.startswith("listening on 127.0.0.1:")
        assert int(line.rsplit(":", 1)[1]) > 0
        assert "1=ram:1048576/512, 2=file:" in p.stdout.readline()
        time.sleep(0.2)
        p.send_signal(signal.SIGTERM)
        assert p.wait(5) == 0
    finally:
        if p.poll() is None:
            p.kill()


def test_cli_rejects_bad_namespace():
    out = subprocess.run([sys.executable, "-m", "target", "--listen", "127.0.0.1:0", "--ns",
                          "tape:1M"], cwd=os.path.dirname(os.path.dirname(HERE)),
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 1 and "unknown backend" in out.stderr
