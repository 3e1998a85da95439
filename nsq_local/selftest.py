"""nsq-selftest: checks NSQ4 and NSQ3 on every ggml device of this build and writes a report to send back.

    nsq-selftest                      # every device, the demo model; report in nsq-selftest.json
    nsq-selftest -m model.gguf -t 8 --json report.json

For each device ggml finds (the CPU always; CUDA, Metal, Vulkan, ... where the build has them):

  ops     NSQ4's and NSQ3's operations on random and adversarial data against nsq_local.reference, the numpy
          reference: set_rows and cpy f32 -> nsq4/nsq3 must give the reference's blocks bit for bit, get_rows and
          cpy nsq4/nsq3 -> f32 its values exactly, flash attention over an NSQ4 or NSQ3 cache (head sizes 64, 128,
          256, grouped-query, masked, decode and prefill, V of the same type or f16, K centered or not) the
          attention over the cache's values within the bound stated in the report. An op the device does not
          support is reported as such: ggml runs it on the CPU, which is not a failure.
  model   one KLD window of the model (f16 cache as the baseline, nsq4, nsq3 and q4_0 caches measured against it,
          as nsq-ppl measures) with every layer and the cache on the device, and the decode speed of f16, q4_0 and
          nsq4 caches after a prefill of --depth tokens.

The report (versions, devices, one line per check with its figures) goes to stdout and, as JSON, to --json; the
JSON is rewritten before each check, so after a crash it names the check that was running. Exit status: 0 when no
check failed, 1 when one did, 2 on a usage error.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from nsq_local import models
from nsq_local._common import EXIT_USAGE, UsageError
from nsq_local.ggml_ops import Backend, Device, devices
from nsq_local.selftest_model import KLD_OFFSET, kld_check, load_text, speed_check
from nsq_local.selftest_ops import FATTN_BOUND_F16, FATTN_BOUND_F32, op_checks
from nsq_local.selftest_report import FAIL, SKIPPED, Check, Report


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="nsq-selftest", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", metavar="FILE",
                    help="GGUF model for the model checks (default: the demo model, SmolLM2-135M-Instruct)")
    ap.add_argument("-t", "--threads", type=int, default=None, help="CPU threads (default: all cores)")
    ap.add_argument("--device", action="append", metavar="NAME",
                    help="check only this ggml device (repeat for more; default: every device)")
    ap.add_argument("-c", "--ctx-size", type=int, default=512,
                    help="tokens in the KLD window (default: 512; the second half is scored)")
    ap.add_argument("--depth", type=int, default=4096, help="prefill before the decode speed (default: 4096)")
    ap.add_argument("--decode-tokens", type=int, default=32, help="tokens decoded per cache type (default: 32)")
    ap.add_argument("--ops-only", action="store_true", help="only the op checks, no model")
    ap.add_argument("--json", metavar="FILE", default="nsq-selftest.json",
                    help="the report as JSON (default: nsq-selftest.json; '-' for none)")
    ap.add_argument("-v", "--verbose", action="store_true", help="show llama.cpp's log")
    return ap


def _demo_model() -> tuple[Optional[Path], str]:
    try:
        return models.smollm2(), ""
    except models.ModelNotInstalled as e:
        return None, str(e)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    threads = args.threads or os.cpu_count() or 1

    def progress(what: str) -> None:
        print(f"nsq-selftest: {what}", file=sys.stderr, flush=True)

    try:
        if args.threads is not None and args.threads < 1:
            raise UsageError(f"-t {args.threads}: give at least 1 thread")
        if args.ctx_size < 8 or args.ctx_size % 2:
            raise UsageError(f"-c {args.ctx_size}: the KLD window must be an even number of tokens, at least 8")
        if args.depth < 1 or args.decode_tokens < 4:
            raise UsageError("--depth must be at least 1 and --decode-tokens at least 4")
        found = devices()
        if args.device:
            names = {d.name for d in found}
            unknown = [n for n in args.device if n not in names]
            if unknown:
                raise UsageError(f"no device named {', '.join(unknown)}; this build has: "
                                 f"{', '.join(d.name for d in found)}")
            found = [d for d in found if d.name in args.device]
        model, missing = (Path(args.model), "") if args.model else _demo_model()
        if model is not None and not model.is_file():
            raise UsageError(f"model file {model} does not exist")
        run = None
        if model is not None and not args.ops_only:
            run = load_text(model, max(KLD_OFFSET + args.ctx_size, args.depth + args.decode_tokens + 2),
                            args.verbose)
    except UsageError as e:
        print(f"nsq-selftest: error: {e}", file=sys.stderr)
        return EXIT_USAGE

    # file names only: the report is sent to a public tracker, and paths name the user's folders
    settings = {"threads": threads, "model": model.name if model else None, "ctx_size": args.ctx_size,
                "depth": args.depth, "decode_tokens": args.decode_tokens, "ops_only": args.ops_only,
                "fattn_bound": f"max|error| <= {FATTN_BOUND_F32:g} * max|V| on the CPU with V nsq4 or nsq3 "
                               f"(float32), {FATTN_BOUND_F16:g} * max|V| otherwise (fp16 or q8_1 arithmetic)"}
    report = Report(None if args.json == "-" else Path(args.json), settings)
    report.data["devices"] = [d.as_dict() for d in found]
    cpu_kld: Optional[Check] = None
    # the CPU first: the other devices' KLD is compared with its
    for dev in sorted(found, key=lambda d: d.kind != "CPU"):
        def step(what: str, dev: Device = dev) -> None:
            progress(f"{dev.name}: {what}")
            report.running(f"{dev.name}: {what}")

        try:
            backend = Backend(dev, threads)
        except RuntimeError as e:
            report.add(Check(dev.name, "backend", FAIL, str(e)))
            continue
        try:
            for c in op_checks(backend, step):
                report.add(c)
        finally:
            backend.close()

        if args.ops_only:
            continue
        if dev.kind not in ("CPU", "GPU", "IGPU"):
            report.add(Check(dev.name, "model", SKIPPED, f"a {dev.kind} device holds no model: llama.cpp uses it "
                                                         "beside the CPU"))
            continue
        if run is None:
            report.add(Check(dev.name, "model", SKIPPED, missing))
            continue
        for what, fn in (("KLD window",
                          lambda: kld_check(dev, run, args.ctx_size, threads, args.verbose, cpu_kld)),
                         (f"decode speed at depth {args.depth}",
                          lambda: speed_check(dev, run, args.depth, args.decode_tokens, threads, args.verbose,
                                              step))):
            step(what)
            try:
                c = fn()
            except Exception as e:
                c = Check(dev.name, what, FAIL, f"{type(e).__name__}: {e}")
            report.add(c)
            if dev.kind == "CPU" and c.name == "KLD window":
                cpu_kld = c
    report.finish()
    print(report.table())
    if report.path is not None:
        print(f"json: {report.path}")
    return 0 if report.data["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
