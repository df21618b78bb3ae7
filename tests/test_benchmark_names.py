"""benchmarks/sweep_speed.py names its results file after the machine: two CPU generations that a
virtual machine gives one model name must not overwrite each other's figures."""
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

ZEN4 = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 17
model name\t: AMD EPYC
flags\t\t: fpu avx512f avx512_bf16

processor\t: 1
cpu family\t: 99
model\t\t: 99
model name\t: Other
"""


@pytest.fixture()
def sweep_speed():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import sweep_speed
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return sweep_speed


def test_cpuinfo_reads_the_first_processor(tmp_path, sweep_speed):
    info_file = tmp_path / "cpuinfo"
    info_file.write_text(ZEN4)
    info = sweep_speed._cpuinfo(info_file)
    assert (info["model name"], info["cpu family"], info["model"]) == ("AMD EPYC", "25", "17")
    assert sweep_speed._cpuinfo(tmp_path / "missing") == {}


def test_machine_name_tells_cpu_generations_apart(monkeypatch, sweep_speed):
    names = []
    for family, model in (("25", "17"), ("26", "2")):
        monkeypatch.setattr(sweep_speed, "_cpuinfo",
                            lambda f=family, m=model: {"model name": "AMD EPYC", "cpu family": f, "model": m})
        monkeypatch.setattr(sweep_speed, "cpu_has_native_bf16", lambda: True)
        names.append(sweep_speed.machine_name(torch.device("cpu")))
    threads = torch.get_num_threads()
    assert names == [f"amd-epyc-f25m17-bf16-{threads}threads", f"amd-epyc-f26m2-bf16-{threads}threads"]


def test_machine_name_without_family_keeps_the_model_name(monkeypatch, sweep_speed):
    monkeypatch.setattr(sweep_speed, "_cpuinfo", lambda: {"model name": "Some CPU"})
    monkeypatch.setattr(sweep_speed, "cpu_has_native_bf16", lambda: False)
    assert sweep_speed.machine_name(torch.device("cpu")) == f"some-cpu-{torch.get_num_threads()}threads"
