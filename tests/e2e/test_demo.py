"""`make demo` end to end with a small fleet: v1 everywhere, the slow v2 rolled back at its first stage, one
page for site north's drift."""

from __future__ import annotations

import json
import sqlite3

from edgefleet_demo.__main__ import main


def test_demo_story_with_six_devices(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["--devices", "6", "--out", str(out), "--drift-timeout", "90"]) == 0
    text = capsys.readouterr().out
    assert "6/6 devices verified, smoke-tested and activated 1.0.0" in text
    assert "dashboard: http://127.0.0.1:" in text and "/ui/" in text
    db = sqlite3.connect(out / "server" / "fleet.sqlite")
    states = dict(db.execute("SELECT version, state FROM rollouts").fetchall())
    assert states == {"1.0.0": "completed", "2.0.0": "rolled_back"}
    alerts = db.execute("SELECT kind, evidence, delivery_state FROM alerts").fetchall()
    assert len(alerts) == 1 and alerts[0][0] == "input_drift" and alerts[0][2] == "delivered"
    assert json.loads(alerts[0][1])["scope"] == "site=north"
