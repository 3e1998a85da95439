"""README's serving line in an installed environment (tests/fresh_install.sh runs it in each fresh venv).

    nsq-calibrate -m SmolLM2 --embed -o OUT
    llama-server -m OUT -ctk nsq4 -ctv nsq4

The llama-server on PATH must be the one installed with nsq-local (in this environment's scripts folder), answer a
completion, and center its nsq4 K cache by the calibration the model file carries, with no flag. Exits non-zero
with the reason otherwise; prints one line on success.
"""
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from nsq_local import models

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from serve_bench import Server, ServerError, free_port, post  # noqa: E402


def main() -> int:
    out = Path(sys.argv[1])
    scripts = Path(sysconfig.get_path("scripts"))
    server = shutil.which("llama-server")
    if server is None or Path(server).parent != scripts:
        print(f"FAIL: llama-server on PATH is {server}, not the one installed in {scripts}")
        return 1
    subprocess.run(["nsq-calibrate", "-m", str(models.smollm2()), "--embed", "-o", str(out)], check=True)

    port = free_port()
    log_path = out.with_suffix(".server.log")
    try:
        # -lv 4: llama.cpp's KV cache lines, the centering one among them, are below the server's default verbosity
        proc = Server([server, "-m", out, "-ctk", "nsq4", "-ctv", "nsq4", "-c", 1024, "-t", 2,
                       "--host", "127.0.0.1", "--port", port, "-lv", 4], log_path, port)
    except ServerError as e:
        print(f"FAIL: {e}")
        return 1
    try:
        answer = post(proc.url + "/completion",
                      {"prompt": "The capital of France is", "n_predict": 8, "temperature": 0})["content"]
    finally:
        proc.stop()
    centered = f"nsq4: K centered by the calibrated means of 30 layers from {out}"
    if centered not in log_path.read_text(errors="replace"):
        print(f"FAIL: llama-server's log lacks '{centered}' (see {log_path})")
        return 1
    if not answer.strip():
        print("FAIL: llama-server answered with empty content")
        return 1
    print(f"llama-server -ctk nsq4 -ctv nsq4 on the embedded copy, centered with no flag: {answer.strip()!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
