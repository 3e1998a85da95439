"""README's serving line in an installed environment (tests/fresh_install.sh runs it in each fresh venv).

    nsq-calibrate -m SmolLM2 --embed -o OUT
    llama-server -m OUT -ctk nsq4 -ctv nsq4

The llama-server on PATH must be the one installed with nsq-local (in this environment's scripts folder), answer a
completion, and center its nsq4 K cache by the calibration the model file carries, with no flag. Exits non-zero
with the reason otherwise; prints one line on success.
"""
import json
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.request
from pathlib import Path

from nsq_local import models


def main() -> int:
    out = Path(sys.argv[1])
    scripts = Path(sysconfig.get_path("scripts"))
    server = shutil.which("llama-server")
    if server is None or Path(server).parent != scripts:
        print(f"FAIL: llama-server on PATH is {server}, not the one installed in {scripts}")
        return 1
    subprocess.run(["nsq-calibrate", "-m", str(models.smollm2()), "--embed", "-o", str(out)], check=True)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log_path = out.with_suffix(".server.log")
    with open(log_path, "w") as log:
        # -lv 4: llama.cpp's KV cache lines, the centering one among them, are below the server's default verbosity
        proc = subprocess.Popen([server, "-m", str(out), "-ctk", "nsq4", "-ctv", "nsq4", "-c", "1024", "-t", "2",
                                 "--host", "127.0.0.1", "--port", str(port), "-lv", "4"],
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                print(f"FAIL: llama-server exited with {proc.returncode}; its log: {log_path}")
                return 1
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                print("FAIL: llama-server did not become ready in 300 s")
                return 1
            time.sleep(0.5)
        body = json.dumps({"prompt": "The capital of France is", "n_predict": 8, "temperature": 0}).encode()
        req = urllib.request.Request(f"{base}/completion", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=300) as r:
            answer = json.load(r)["content"]
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    log_text = log_path.read_text(errors="replace")
    centered = f"nsq4: K centered by the calibrated means of 30 layers from {out}"
    if centered not in log_text:
        print(f"FAIL: llama-server's log lacks '{centered}' (see {log_path})")
        return 1
    if not answer.strip():
        print("FAIL: llama-server answered with empty content")
        return 1
    print(f"llama-server -ctk nsq4 -ctv nsq4 on the embedded copy, centered with no flag: {answer.strip()!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
