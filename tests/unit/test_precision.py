import logging

import pytest

from polydistill.student import precision
from polydistill.student.precision import cpu_flags, use_bf16

CPUINFO = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx2 avx512f\nbugs\t\t: none\n"


def test_flags_of_the_first_processor():
    assert cpu_flags(CPUINFO) == {"fpu", "sse2", "avx2", "avx512f"}
    assert cpu_flags("processor : 0\nFeatures : fp asimd bf16\n") == {"fp", "asimd", "bf16"}
    assert cpu_flags("") == frozenset()


@pytest.mark.parametrize("has_bf16, requested, device, expected", [
    (False, True, "cpu", False),   # emulated bfloat16: fall back to float32
    (True, True, "cpu", True),
    (False, True, "cuda", True),   # GPUs decide for themselves
    (False, False, "cpu", False),
])
def test_bf16_only_where_it_runs_natively(monkeypatch, caplog, has_bf16, requested, device, expected):
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: has_bf16)
    precision._warn_once.cache_clear()
    with caplog.at_level(logging.WARNING, logger="polydistill.student.precision"):
        assert use_bf16(requested, device, "training.precision") is expected
    fell_back = requested and not expected
    assert ("training.precision asks for bfloat16" in caplog.text) is fell_back
