"""`bitdance plan --quantize` (issue #12): the plan of BitDance-14B-64x at 1024x1024 with guidance counts the
weights as a quantised load keeps them, and meets the issue's targets."""

from __future__ import annotations

import json

import pytest

from bitdance_core import cli


def _plan(capsys, memory: str, mode: str) -> dict:
    rc = cli.main(["plan", "--preset", "14b-64x", "--gpu-memory", memory, "--size", "1024x1024", "--quantize", mode,
                   "--json"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == (0 if out["fits"] else 1)
    return out


@pytest.mark.slow
def test_48gib_int8_serves_at_least_16_requests(capsys):
    p = _plan(capsys, "48GiB", "int8")
    assert p["fits"] and p["max_concurrent_requests"] >= 16, p
    # the prior's linears: 26.4 GB in bf16, 13.2 GB in int8 (+ scales); its embedding table 1.56 GB -> 0.78 GB
    assert 16.5 * 2**30 < p["weights_bytes"] < 17.2 * 2**30, p["weights_bytes"]


@pytest.mark.slow
def test_24gib_int8_fits_at_least_2_requests(capsys):
    """Issue #12's 24 GB target; reached once the token embedding table is int8 too (1 request without it)."""
    p = _plan(capsys, "24GiB", "int8")
    assert p["fits"] and p["max_concurrent_requests"] >= 2, p
    assert p["weights_bytes"] < 17.2 * 2**30, p["weights_bytes"]  # the int8 table + its scales are counted


def test_unknown_quantize_mode_is_refused_with_the_choices(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["plan", "--preset", "14b-64x", "--gpu-memory", "48GiB", "--quantize", "int4"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--quantize" in err and "'int4'" in err and all(f"'{m}'" in err for m in ("none", "int8", "fp8"))
