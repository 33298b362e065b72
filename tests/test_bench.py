import json
import subprocess
import sys

import pytest

from ctclab.cli import main


def test_bench_cli_writes_documented_json(tmp_path, capsys):
    out = tmp_path / "out.json"
    assert main(["bench", "--shape", "16,4,6,5", "--repeats", "1", "--warmup", "0", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "fused" in printed and "loss matches: yes" in printed
    (result,) = json.loads(out.read_text())
    assert (result["T"], result["B"], result["C"], result["L"]) == (16, 4, 6, 5)
    assert [i["impl"] for i in result["impls"]] == ["builtin", "autograd", "fused"]
    for impl in result["impls"]:
        for key in ("fwd_ms", "bwd_ms", "total_ms", "fwd_ratio", "bwd_ratio", "total_ratio", "peak_mb"):
            assert isinstance(impl[key], float) and impl[key] == impl[key], key
        assert impl["total_ms"] > 0
    assert result["checks"] == {"loss matches": True, "grad matches": True, "CE grad matches": True}


def test_bench_rejects_a_malformed_shape(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--shape", "16,4,6"])
    assert "T,B,C,L" in capsys.readouterr().err


def test_python_dash_m_entry_point():
    out = subprocess.run([sys.executable, "-m", "ctclab", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "bench" in out.stdout
