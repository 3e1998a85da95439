"""nsq-selftest's model checks on one ggml device, with every layer and the cache on it: one KLD window of the model
(f16 cache as the baseline, nsq4, nsq3 and q4_0 caches measured against it, as nsq-ppl measures) and the decode speed
of f16, q4_0 and nsq4 caches after a prefill.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import numpy.typing as npt

from nsq_local import calibrate, ppl
from nsq_local._common import NSQ_TYPES, UsageError
from nsq_local.capture import Model
from nsq_local.ggml_ops import Device
from nsq_local.selftest_report import FAIL, PASS, Check

# what a working cache costs SmolLM2 on a window, against the f16 cache: mean KLD about 0.03 for nsq4
# (docs/quality.md), 0.08 for nsq3 as shipped and 0.14 for a flat nsq3 cache (the default window, 2026-12-02); a
# cache that stores or reads wrong blocks gives a KLD above 1
KLD_LIMIT = {"nsq4": 0.1, "nsq3": 0.3}
# a device's KLD of each type against the CPU's on the same window (its own f16 baseline each): GPU arithmetic moves
# logits a little, a wrong kernel by far more
KLD_DEVICE_RATIO = 1.5
KLD_DEVICE_SLACK = 0.01

# tokens of the built-in text: the calibration reads its first two 2048-token windows, so the KLD window starts after
# them; the decode-speed prefill reads the text from its start
KLD_OFFSET = 4096


@dataclass
class ModelRun:
    path: Path
    tokens: npt.NDArray[np.int32]
    add_bos: bool
    bos: int


def load_text(model: Path, need: int, verbose: bool) -> ModelRun:
    with Model(model, verbose=verbose, device="CPU") as m:
        tokens = m.tokenize(calibrate.builtin_text())
        run = ModelRun(model, tokens, m.add_bos, m.bos)
        if len(tokens) < need:
            raise UsageError(f"the built-in text has {len(tokens)} tokens of this model, {need} are needed: use a "
                             "smaller --depth or -c")
        if need > m.n_ctx_train:
            raise UsageError(f"--depth plus --decode-tokens ({need}) exceeds the model's training context "
                             f"{m.n_ctx_train}")
    return run


def kld_check(dev: Device, run: ModelRun, n_ctx: int, threads: int, verbose: bool,
              cpu: Optional[Check]) -> Check:
    """One window, as nsq-ppl measures it: nsq4, nsq3 and q4_0 caches against an f16 cache, every context on the
    device."""
    window = run.tokens[KLD_OFFSET:KLD_OFFSET + n_ctx]
    types = (*NSQ_TYPES, "q4_0")
    res = ppl.evaluate(run.path, window, n_ctx, 1, [(t, t) for t in types], True, True, threads, 512,
                       run.add_bos, run.bos, verbose, None, device=dev.name)
    by_type = dict(zip(types, res["results"]))
    figures = {"window": f"tokens {KLD_OFFSET}..{KLD_OFFSET + n_ctx - 1} of the built-in text", "n_ctx": n_ctx,
               "tokens_scored": res["tokens_scored"], "ppl_f16": res["baseline"]["ppl"]}
    for t, r in by_type.items():
        figures.update({f"kld_{t}": r["kld_mean"], f"kld_{t}_se": r["kld_se"], f"top1_{t}": r["top1_agree"]})
    # one calibration centers every nsq type's K
    calib = by_type["nsq4"]["nsq_calib"]
    figures["nsq_calib"] = Path(calib).name if calib else None
    detail = ("KLD " + ", ".join(f"{t} {r['kld_mean']:.4f}" for t, r in by_type.items())
              + f" (f16 PPL {res['baseline']['ppl']:.3f})")
    problems = []
    for t in NSQ_TYPES:
        kld = by_type[t]["kld_mean"]
        if not kld < KLD_LIMIT[t]:
            problems.append(f"{t}'s KLD is not below {KLD_LIMIT[t]}")
        if cpu is not None and cpu.status == PASS:
            limit = KLD_DEVICE_RATIO * cpu.figures[f"kld_{t}"] + KLD_DEVICE_SLACK
            figures[f"kld_{t}_cpu"] = cpu.figures[f"kld_{t}"]
            if not kld <= limit:
                problems.append(f"{t}'s KLD is above {limit:.4f} ({KLD_DEVICE_RATIO}x the CPU's + {KLD_DEVICE_SLACK})")
    if problems:
        return Check(dev.name, "KLD window", FAIL, detail + ": " + "; ".join(problems), figures)
    return Check(dev.name, "KLD window", PASS, detail, figures)


def speed_check(dev: Device, run: ModelRun, depth: int, n_decode: int, threads: int, verbose: bool,
                progress: Callable[[str], None]) -> Check:
    """Decode tokens/s of f16, q4_0, nsq4 and nsq3 caches (flash attention on; nsq4 and nsq3 as shipped) after a
    prefill of `depth` tokens. The contexts decode in turns, one token each, and the speed is that of the median
    token: a busy machine slows them alike, and a stall of one token does not count."""
    types = ("f16", "q4_0", "nsq4", "nsq3")
    decoders = []
    per_token: dict[str, list[float]] = {t: [] for t in types}
    try:
        for t in types:
            progress(f"prefill of {depth} tokens, {t} cache")
            d = calibrate.Decoder(run.path, n_ctx=depth + n_decode + 1, type_k=t, type_v=t, flash_attn=True,
                                  n_threads=threads, verbose=verbose, device=dev.name)
            decoders.append(d)
            d.decode(run.tokens[:depth], 0, logits=False)
            d.decode(run.tokens[depth:depth + 1], depth, logits=True)  # warm-up: the first decode-sized graph
        progress(f"decoding {n_decode} tokens per cache type")
        for pos in range(depth + 1, depth + 1 + n_decode):
            for t, d in zip(types, decoders):
                t0 = time.perf_counter()
                d.decode(run.tokens[pos:pos + 1], pos, logits=True)
                per_token[t].append(time.perf_counter() - t0)
    finally:
        for d in decoders:
            d.close()
    tps = {t: 1 / float(np.median(dt)) for t, dt in per_token.items()}
    figures = {"depth": depth, "tokens": n_decode, **{f"tps_{t}": tps[t] for t in types},
               **{f"{n}_over_{b}": tps[n] / tps[b] for n in ("nsq4", "nsq3") for b in ("f16", "q4_0")}}
    return Check(dev.name, f"decode speed at depth {depth}", PASS,
                 f"nsq4 {tps['nsq4']:.1f} t/s, nsq3 {tps['nsq3']:.1f} (f16 {tps['f16']:.1f}, q4_0 {tps['q4_0']:.1f}): "
                 f"nsq4 {figures['nsq4_over_f16']:.2f}x f16, {figures['nsq4_over_q4_0']:.2f}x q4_0; "
                 f"nsq3 {figures['nsq3_over_f16']:.2f}x f16, {figures['nsq3_over_q4_0']:.2f}x q4_0", figures)
