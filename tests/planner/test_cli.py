"""``pdlb plan`` and ``pdlb plan profile`` as a user runs them (the model only: the
simulation is bench/planner.py's)."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from lb.cli import main
from lb.planner import profile as profiles
from tests.planner.test_model import SLOW


def test_plan_prints_a_table_a_plot_and_json(tmp_path: Path, capsys):
    """A rate range over a measured-style profile: one row per rate, a PNG, the JSON."""
    prof = profiles.from_emulator(SLOW).write(tmp_path / "p.json")
    rc = main(["plan", "--profile", str(prof), "--input-len", "1024:256", "--output-len",
               "32:8", "--slo", "ttft:1500,tpot:60", "--rate-range", "2:8:4", "--no-simulate",
               "--plot", str(tmp_path / "plan.png"), "--json", str(tmp_path / "plan.json")])
    out = capsys.readouterr().out
    assert rc == 0
    rows = [line for line in out.splitlines() if line.startswith("| ") and "rate" not in line]
    assert len(rows) == 4 and "prefill compute" in out
    assert "not simulated" in out
    assert (tmp_path / "plan.png").read_bytes()[:4] == b"\x89PNG"
    data = orjson.loads((tmp_path / "plan.json").read_bytes())
    assert [p["rate"] for p in data["plans"]] == [2, 4, 6, 8]
    assert all(p["prefill"] >= 1 and p["decode"] >= 1 for p in data["plans"])


@pytest.mark.parametrize(("args", "message"), [
    (["--emulator-profile", "--mix", "nope", "--slo", "ttft:1,tpot:1", "--rate", "1"],
     "unknown mix 'nope'"),
    (["--emulator-profile", "--mix", "chat", "--slo", "ttft:100", "--rate", "1"],
     "needs both ttft:MS and tpot:MS"),
    (["--emulator-profile", "bogus=1", "--mix", "chat", "--slo", "ttft:1,tpot:1", "--rate",
      "1"], "bad emulator knob 'bogus=1'"),
    (["--emulator-profile", "--mix", "chat", "--slo", "ttft:1,tpot:1"], "give --rate"),
    (["--emulator-profile", "--mix", "chat", "--slo", "ttft:1,tpot:1", "--rates", "1,-2"],
     "rates must be positive"),
    (["--profile", "/nonexistent.json", "--mix", "chat", "--slo", "ttft:1,tpot:1", "--rate",
      "1"], "/nonexistent.json: cannot read"),
    (["--emulator-profile", "--access-log", "/nonexistent.log", "--slo", "ttft:1,tpot:1"],
     "/nonexistent.log: cannot read"),
])
def test_bad_input_is_a_clear_error(args: list[str], message: str, capsys):
    """Each mistake exits 2 with one line naming it."""
    assert main(["plan", *args]) == 2
    assert message in capsys.readouterr().err


def test_profile_needs_a_decode_url(tmp_path: Path, capsys):
    assert main(["plan", "profile", "--prefill", "http://127.0.0.1:9", "--out",
                 str(tmp_path / "p.json")]) == 2
    assert "--prefill needs --decode" in capsys.readouterr().err


def test_profile_against_a_server_that_is_not_there(tmp_path: Path, capsys):
    """Connection refused: exit 2, nothing written."""
    assert main(["plan", "profile", "--prefill", "http://127.0.0.1:9", "--decode",
                 "http://127.0.0.1:9", "--out", str(tmp_path / "p.json")]) == 2
    assert "cannot measure" in capsys.readouterr().err
    assert not (tmp_path / "p.json").exists()


def test_profile_emulate_measures_and_writes(tmp_path: Path, capsys):
    """``plan profile --emulate`` with a small sweep: the fit printed against each point,
    the file loadable, the emulator's knobs kept for the simulation."""
    out = tmp_path / "p.json"
    knobs = [f"{k}={v}" for k, v in SLOW.items()]
    assert main(["plan", "profile", "--emulate", *knobs, "time_scale=4", "--prompt-lengths",
                 "256,1024", "--batches", "1,2", "--concurrencies", "1,8,16", "--contexts",
                 "64,512", "--decode-tokens", "16", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert text.count("measured") >= 6 and f"wrote {out}" in text
    prof = profiles.load(out)
    assert len(prof.prefill.points) == 4 and len(prof.decode.points) == 6
    assert prof.emulator["prefill_tokens_per_s"] == 4000
    assert 3000 < prof.prefill.tokens_per_s < 5000


def test_profile_rejects_a_bad_sweep(tmp_path: Path, capsys):
    assert main(["plan", "profile", "--emulate", "--concurrencies", "1,x", "--out",
                 str(tmp_path / "p.json")]) == 2
    assert "--concurrencies '1,x'" in capsys.readouterr().err
