"""The README's main job: the tiny offline generation demo runs end to end."""

import runpy
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_generate_demo_writes_a_video(tmp_path, monkeypatch, capsys):
    output = tmp_path / "demo"
    monkeypatch.setattr(sys, "argv", ["generate.py", "--output", str(output), "--num_frames", "21"])
    module = runpy.run_path(str(EXAMPLES / "generate.py"), run_name="not_main")
    assert module["main"]() == 0
    written = [p for p in tmp_path.iterdir() if p.stem == "demo"]
    assert len(written) == 1 and written[0].stat().st_size > 0
    assert "21 frames of 96x64" in capsys.readouterr().out
