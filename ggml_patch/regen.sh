#!/usr/bin/env bash
# Rewrite ggml_patch/*.patch from a work tree made by `prepare.py --commits`: one patch per commit after the
# pristine sdist, named by the commit's subject; the commit message's body is the patch's header (DEP-3 style:
# Description, Upstream-Candidate, Author, Forwarded, Last-Update), then the diff with small (3-line) context.
set -euo pipefail
tree=${1:?usage: ggml_patch/regen.sh WORK_TREE}
here=$(cd "$(dirname "$0")" && pwd)
base=$(git -C "$tree" rev-list --max-parents=0 HEAD)
for c in $(git -C "$tree" rev-list --reverse "$base"..HEAD); do
    name=$(git -C "$tree" log -1 --format=%s "$c")
    case $name in *.patch) ;; *) echo "commit $c: subject '$name' is not a patch file name" >&2; exit 1;; esac
    body=$(git -C "$tree" log -1 --format=%b "$c")
    case $body in
        Description:*) ;;
        *) echo "commit $c ($name): its message has no header (Description: ...)" >&2; exit 1;;
    esac
    { printf '%s\n\n' "$body"; git -C "$tree" diff -U3 --no-color "$c~1" "$c"; } > "$here/$name"
    echo "wrote ggml_patch/$name"
done
