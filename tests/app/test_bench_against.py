"""offload-studio bench: llama-bench's test set (-p lists), and --against running llama.cpp's bench.

--against is exercised with a stand-in llama-bench (a script printing llama-bench's JSON rows
for the tests it was asked for), so the comparison is checked without llama.cpp installed.
"""
from __future__ import annotations

import json
import stat
import sys

import pytest

from app.cli import main
from app.commands.bench import counts

FAKE_LLAMA_BENCH = """#!{python}
import json, sys
argv = sys.argv[1:]
value = lambda flag: argv[argv.index(flag) + 1]
with open({log!r}, "w") as log:
    json.dump(argv, log)
rows = [dict(n_prompt=int(p), n_gen=0, avg_ts=1000.0, stddev_ts=1.0) for p in value("-p").split(",")]
rows.append(dict(n_prompt=0, n_gen=int(value("-n")), avg_ts=50.0, stddev_ts=0.5))
print(json.dumps(rows))
"""


def test_prompt_counts_are_lists():
    assert counts("128") == [128]
    assert counts("128,512") == [128, 512]
    with pytest.raises(Exception):
        counts("0")


def test_against_runs_llama_bench_with_the_same_settings(capsys, tmp_path, fixtures_dir):
    log = tmp_path / "argv.json"
    fake = tmp_path / "llama-bench"
    fake.write_text(FAKE_LLAMA_BENCH.format(python=sys.executable, log=str(log)))
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    model = fixtures_dir / "llama-dense" / "Q4_0.gguf"
    assert main(["bench", "-m", str(model), "-p", "8,16", "-n", "2", "-r", "1", "-t", "1",
                 "--against", str(fake), "-fa", "on"]) == 0
    argv = json.loads(log.read_text())
    assert argv[argv.index("-m") + 1] == str(model)
    assert argv[argv.index("-p") + 1] == "8,16" and argv[argv.index("-n") + 1] == "2"
    assert argv[argv.index("-t") + 1] == "1" and argv[argv.index("-fa") + 1] == "on"
    lines = capsys.readouterr().out.splitlines()
    speeds = lines[:next(i for i, line in enumerate(lines) if line.startswith("decode roofline"))]
    rows = {line.split()[1]: line.split() for line in speeds[2:]}
    assert set(rows) == {"pp8", "pp16", "tg2"}
    for test, theirs in (("pp8", 1000.0), ("pp16", 1000.0), ("tg2", 50.0)):
        ours = float(rows[test][3])          # printed rounded, so the ratio is checked to that precision
        ratio = float(rows[test][-1].rstrip("x"))
        assert ratio == pytest.approx(ours / theirs, rel=2e-3, abs=6e-3)
