#!/usr/bin/env bash
# A first install, exactly as README.md tells it, where nothing is warm: a fresh copy of this checkout (no build/
# folder), a fresh virtual environment and an empty sdist cache ($NSQ_CACHE_DIR). Once with `python3 -m venv` and
# pip, once with `uv venv` and `uv pip`; each builds nsq-local from scratch (about 7 minutes on 2 cores), asks
# nsq-chat one question and llama-server another (tests/serve_check.py). It catches what CI's warm build folder and
# cache hide, such as a configure step that needs something the isolated build environment lacks.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)

# the install line is read from README.md, so that the README and this check cannot drift apart
install_line=$(awk '/^## Install and chat/ { section = 1 } section && /^```sh/ { getline; print; exit }' \
                   "$ROOT/README.md")
if [[ $install_line != *"pip install"* ]]; then
    echo "FAIL: no \`pip install\` line first in the sh block of README.md's \"Install and chat\" section" \
         "(found: '$install_line'); tests/fresh_install.sh reads the install command from there" >&2
    exit 1
fi
if ! command -v uv >/dev/null; then
    echo "FAIL: uv is not installed; install it with: python3 -m pip install uv" >&2
    exit 1
fi

# a user's shell has neither: the build must fetch the sdist itself and work with the default options
unset NSQ_UPSTREAM_SDIST CMAKE_ARGS
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-2}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
trap 'exit 130' INT TERM  # so that the EXIT trap cleans up on Ctrl-C or a CI timeout too
results=()

# $1: a name, $2: the command that creates a virtual environment at the path it is given, $3: the install line
fresh_install() {
    local name=$1 make_venv=$2 line=$3 dir="$WORK/$1" start=$SECONDS
    mkdir -p "$dir/src"
    # tracked and untracked-but-not-ignored files, as `git clone` plus the work in progress would give them
    (cd "$ROOT" && git ls-files -z -co --exclude-standard | tar --null --ignore-failed-read -T - -cf - 2>/dev/null) |
        tar -xf - -C "$dir/src" || { results+=("FAIL: $name: could not copy the checkout to $dir/src"); return; }
    echo "== $name: $make_venv venv && $line (in a fresh copy of the checkout, empty NSQ_CACHE_DIR)"
    (
        cd "$dir/src" || exit 1
        $make_venv "$dir/venv" || { echo "'$make_venv' failed (exit $?)" > "$dir/why"; exit 1; }
        . "$dir/venv/bin/activate"
        NSQ_CACHE_DIR=$(mktemp -d -p "$dir") && export NSQ_CACHE_DIR || exit 1
        bash -c "$line" || { echo "'$line' failed (exit $?)" > "$dir/why"; exit 1; }
        echo "$((SECONDS - start))" > "$dir/install_s"
        timeout 900 nsq-chat -p "What is the capital of France?" -n 16 --temp 0 < /dev/null > "$dir/answer.txt" ||
            { echo "nsq-chat failed (exit $?)" > "$dir/why"; exit 1; }
        [[ -n $(tr -d '[:space:]' < "$dir/answer.txt") ]] ||
            { echo "nsq-chat exited 0 but printed no answer" > "$dir/why"; exit 1; }
        # README's serving line: llama.cpp's own server from the same install, on a copy of the model that carries
        # its calibration, answers and centers its nsq4 K cache with no flag
        timeout 900 python "$ROOT/tests/serve_check.py" "$dir/model-nsq.gguf" > "$dir/server.txt" 2>&1 ||
            { echo "llama-server check failed: $(tail -n 3 "$dir/server.txt" | tr '\n' ' ')" > "$dir/why"; exit 1; }
    )
    if [[ $? -eq 0 ]]; then
        local built answer served
        built=$(cat "$dir/install_s")
        answer=$(tr '\n' ' ' < "$dir/answer.txt" | cut -c1-100)
        served=$(tail -n 1 "$dir/server.txt")
        results+=("PASS: $name: install ${built} s, nsq-chat and llama-server $((SECONDS - start - built)) s,$(
                  ) answer: $answer; $served")
    else
        results+=("FAIL: $name: $(cat "$dir/why" 2>/dev/null || echo 'see above'), after $((SECONDS - start)) s")
    fi
    echo "${results[-1]}"
    rm -rf "$dir"
}

fresh_install pip "python3 -m venv" "$install_line"
fresh_install uv "uv venv -q" "${install_line//pip install/uv pip install}"

echo "== fresh install from README.md"
printf '%s\n' "${results[@]}"
if [[ ${results[*]} == *FAIL:* ]]; then exit 1; fi
