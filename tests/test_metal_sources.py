"""The ggml-metal-nsq patch leaves upstream's Metal libraries as they were: the Metal code of NSQ4 and NSQ3 is
compiled only into the NSQ types' own libraries (nsq, fa_nsq, fa_vec_nsq), so that a compile error in it costs a Mac
the NSQ types (their ops run on the CPU), never the Metal backend.

Nothing here compiles Metal. For every upstream library, the source the Metal compiler is given is rebuilt in Python
from the pristine sdist and from the patched tree, as CMake's embed step writes it (GGML_METAL_EMBED_LIBRARY, which
llama-cpp-python turns on for Apple) and as ggml_metal_library_flatten_source reads it at run time otherwise, and the
two are compared byte for byte. ggml-common.h, which every library inlines and which declares NSQ4 and NSQ3 for the
CPU and CUDA, is taken as Metal sees it: its conditionals evaluated by the host preprocessor for Metal without
GGML_METAL_NSQ, the macro only NSQ4's libraries are compiled with.
"""
from __future__ import annotations

import difflib
import os
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from helpers import pinned_sdist

SRC = "vendor/llama.cpp/ggml/src"
NSQ_KINDS = ("nsq", "fa_nsq", "fa_vec_nsq")
NSQ_FILES = ({"ggml-metal/kernels/nsq4.h", "ggml-metal/kernels/nsq3.h"}
             | {f"ggml-metal/kernels/{kind}.metal" for kind in NSQ_KINDS})
# the upstream files the patches may change: the NSQ libraries' registration (CMake sources, library list), the
# supports_op entries and the fallback that makes the libraries optional, the F16 pre-conversion choice, and the
# K/V kernel names and F16 pre-conversion of the one mixed pair (an NSQ4 K with an NSQ3 V)
SHARED_FILES = {"ggml-metal/CMakeLists.txt", "ggml-metal/ggml-metal-device.m", "ggml-metal/ggml-metal-device.h",
                "ggml-metal/ggml-metal-device.cpp", "ggml-metal/ggml-metal-ops.cpp"}
# the headers CMake's embed step prepends, in its order, to a source that includes them (common.h always)
EMBED_HEADERS = ("dequantize.h", "quantize.h", "nsq4.h", "nsq3.h", "fa_common.metal", "fa_vec_common.metal")

Files = dict[str, str]  # path under ggml/src -> text


def metal_files(read: dict[str, bytes]) -> Files:
    return {rel: data.decode() for rel, data in read.items()
            if rel.startswith("ggml-metal/") or rel == "ggml-common.h"}


@pytest.fixture(scope="module")
def pristine() -> Files:
    """ggml/src's Metal files and ggml-common.h, straight from the pinned sdist (verified as prepare.py does)."""
    sdist = pinned_sdist()
    found = {}
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            root, _, rel = member.name.partition(f"/{SRC}/")
            if member.isfile() and rel and "/" not in root:
                found[rel] = tar.extractfile(member).read()
    return metal_files(found)


@pytest.fixture(scope="module")
def patched(upstream_tree) -> Files:
    base = upstream_tree / SRC
    return metal_files({str(p.relative_to(base)): p.read_bytes()
                        for p in base.rglob("*") if p.is_file() and p.relative_to(base).parts[0] == "ggml-metal"}
                       | {"ggml-common.h": (base / "ggml-common.h").read_bytes()})


@pytest.fixture(scope="module")
def cxx() -> str:
    cxx = os.environ.get("CXX", "g++")
    if not shutil.which(cxx):
        pytest.fail(f"{cxx} is missing: these tests evaluate ggml-common.h's conditionals with the host preprocessor")
    return cxx


def metal_view(cxx: str, common: str, tmp: Path, *defines: str) -> str:
    """ggml-common.h as the Metal compiler reads it in the kernel libraries: conditionals evaluated for Metal, macros
    left unexpanded, comments and line breaks kept (-fdirectives-only). <metal_stdlib> is an empty stand-in."""
    (tmp / "metal_stdlib").write_text("")
    cmd = [cxx, "-E", "-P", "-fdirectives-only", "-undef", "-x", "c++", "-I", str(tmp),
           "-DGGML_COMMON_DECL_METAL", "-DGGML_COMMON_IMPL_METAL", *(f"-D{d}" for d in defines), "-"]
    proc = subprocess.run(cmd, input=common, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def sed_deletions(cmake: str) -> list[re.Pattern]:
    """The `sed -e "/PATTERN/d"` expressions of the embed step's step 2, from CMakeLists.txt itself."""
    (line,) = [ln for ln in cmake.splitlines() if "COMMAND sed" in ln and '.tmp1" > ' in ln]
    return [re.compile(p.replace("\\#", "#").replace('\\"', '"')) for p in re.findall(r'-e "/(.*?)/d"', line)]


def embedded(files: Files, kind: str, common: str) -> str:
    """What CMake's embed step (ggml-metal/CMakeLists.txt) writes for kernels/<kind>.metal: the headers the source
    includes and the source, concatenated; local includes and `#pragma once` deleted; the ggml-common.h sentinel
    and the ggml-metal-impl.h include replaced by those files."""
    src = files[f"ggml-metal/kernels/{kind}.metal"]
    parts = [files["ggml-metal/kernels/common.h"]]
    parts += [files[f"ggml-metal/kernels/{h}"] for h in EMBED_HEADERS if f'#include "{h}"' in src]
    drop = sed_deletions(files["ggml-metal/CMakeLists.txt"])
    out = []
    for line in "".join(parts + [src]).splitlines(keepends=True):
        if any(p.search(line) for p in drop):
            continue
        if "__embed_ggml-common.h__" in line:
            out.append(common)
        elif '#include "ggml-metal-impl.h"' in line:
            out.append(files["ggml-metal/ggml-metal-impl.h"])
        else:
            out.append(line)
    return "".join(out)


QUOTED_INCLUDE = re.compile(r'^\s*#\s*include\s*"([^"]*)"')


def flattened(files: Files, kind: str, common: str) -> str:
    """What ggml_metal_library_flatten_source (ggml-metal-device.m) compiles for kernels/<kind>.metal when there is
    neither an embedded library nor a default.metallib: every quoted include inlined once, from kernels/,
    ggml-metal/ or ggml/src, `#pragma once` dropped."""
    search = ("ggml-metal/kernels/", "ggml-metal/", "")
    seen: set[str] = set()
    out: list[str] = []

    def flatten(path: str) -> None:
        if path in seen:
            return
        seen.add(path)
        text = common if path == "ggml-common.h" else files[path]
        for line in text.split("\n"):
            if line.strip() == "#pragma once":
                continue
            m = QUOTED_INCLUDE.match(line)
            if m:
                flatten(next(d + m.group(1) for d in search if d + m.group(1) in files))
                continue
            out.append(line + "\n")

    flatten(f"ggml-metal/kernels/{kind}.metal")
    return "".join(out)


def kernel_sources(cmake: str, name: str) -> list[str]:
    block = re.search(r"^set\(" + name + r"\n(.*?)^\)", cmake, re.M | re.S)
    assert block, f"CMakeLists.txt has no {name} list"
    return [Path(src).stem for src in block.group(1).split()]


def upstream_kinds(pristine: Files) -> list[str]:
    return kernel_sources(pristine["ggml-metal/CMakeLists.txt"], "METALLIB_KERNEL_SOURCES")


def differing_kinds(pristine: Files, patched: Files, build, cxx: str, tmp: Path) -> list[str]:
    old_common = metal_view(cxx, pristine["ggml-common.h"], tmp)
    new_common = metal_view(cxx, patched["ggml-common.h"], tmp)
    return [kind for kind in upstream_kinds(pristine)
            if build(pristine, kind, old_common) != build(patched, kind, new_common)]


@pytest.mark.parametrize("build", [embedded, flattened], ids=["embedded", "source"])
def test_upstream_libraries_are_compiled_from_upstreams_source(pristine, patched, build, cxx, tmp_path):
    kinds = upstream_kinds(pristine)
    assert len(kinds) > 30 and not set(kinds) & set(NSQ_KINDS)
    assert differing_kinds(pristine, patched, build, cxx, tmp_path) == []


@pytest.mark.parametrize("build", [embedded, flattened], ids=["embedded", "source"])
@pytest.mark.parametrize("kind", ["nsq4", "nsq3"])
def test_nsq_code_in_a_shared_header_would_be_caught(pristine, patched, build, kind, cxx, tmp_path):
    """Negative control: one of the type's block functions put back into quantize.h changes the quantize library."""
    code = re.search(r"^static inline int " + kind + r"_code\(.*?^}\n", patched[f"ggml-metal/kernels/{kind}.h"],
                     re.M | re.S).group(0)
    broken = dict(patched)
    broken["ggml-metal/kernels/quantize.h"] += "\n" + code
    assert "quantize" in differing_kinds(pristine, broken, build, cxx, tmp_path)


@pytest.mark.parametrize("build", [embedded, flattened], ids=["embedded", "source"])
@pytest.mark.parametrize("kind", NSQ_KINDS)
def test_nsq4_libraries_get_nsq4_h_after_ggml_common_h(patched, kind, build, cxx, tmp_path):
    """Both paths resolve the NSQ headers in NSQ4's libraries (CMake's embed step knows them by name), once each,
    after ggml-common.h's NSQ declarations, nsq4.h (whose fp16 conversion nsq3.h uses) before nsq3.h."""
    text = build(patched, kind, metal_view(cxx, patched["ggml-common.h"], tmp_path, "GGML_METAL_NSQ"))
    assert text.count("void quantize_nsq4(") == 1 and text.count("void quantize_nsq3(") == 1
    assert text.index("} block_nsq4;") < text.index("void quantize_nsq4(")
    assert text.index("} block_nsq3;") < text.index("static inline ushort nsq_fp16_bits(") < text.index(
        "void quantize_nsq3(")
    # the embedded source keeps dequantize.h's include of ggml-common.h, in the branch it does not compile
    assert [ln for ln in text.splitlines() if QUOTED_INCLUDE.match(ln) and "ggml-common.h" not in ln] == []


def test_ggml_common_h_declares_nsq4_to_nsq4s_libraries_only(pristine, patched, cxx, tmp_path):
    """Metal without GGML_METAL_NSQ reads upstream's ggml-common.h byte for byte, nothing of NSQ4 or NSQ3; with it,
    their blocks and tables. A guard that let them through is caught (negative control)."""
    ours = patched["ggml-common.h"]
    upstream = metal_view(cxx, pristine["ggml-common.h"], tmp_path)
    assert metal_view(cxx, ours, tmp_path) == upstream
    assert "nsq" not in metal_view(cxx, ours, tmp_path).lower()
    for name in ("block_nsq4", "kvalues_nsq4", "kscales_nsq4", "QK_NSQ4", "NSQ_GRID",
                 "block_nsq3", "kvalues_nsq3", "kscales_nsq3", "QK_NSQ3"):
        assert name in metal_view(cxx, ours, tmp_path, "GGML_METAL_NSQ")
    assert ours.count("|| defined(GGML_METAL_NSQ)") == 2
    leaky = ours.replace("|| defined(GGML_METAL_NSQ)", "|| 1")
    assert metal_view(cxx, leaky, tmp_path) != upstream


def test_only_the_nsq_libraries_are_compiled_with_ggml_metal_nsq(patched):
    """The macro reaches the NSQ types' three libraries and no other: at run time (ggml_metal_library_compile_all,
    embedded and source paths) and in default.metallib's build-time compile (GGML_METAL_EMBED_LIBRARY=OFF)."""
    device = patched["ggml-metal/ggml-metal-device.m"]
    (body,) = re.findall(r"static bool ggml_metal_lib_is_nsq\(int kind\) \{(.*?)\n\}", device, re.S)
    assert set(re.findall(r"GGML_METAL_LIB_(\w+)", body)) == {"NSQ", "FA_NSQ", "FA_VEC_NSQ"}
    code = [ln for ln in re.findall(r".*GGML_METAL_NSQ.*", device) if not ln.lstrip().startswith("//")]
    assert code == ['    [prep_nsq setObject:@"1" forKey:@"GGML_METAL_NSQ"];']
    assert "options.preprocessorMacros = ggml_metal_lib_is_nsq(kind) ? prep_nsq : prep;" in device
    for kind in NSQ_KINDS:
        assert re.search(r"X\(\w+,\s+" + kind + r"\)", device)

    cmake = patched["ggml-metal/CMakeLists.txt"]
    assert kernel_sources(cmake, "METALLIB_NSQ_SOURCES") == list(NSQ_KINDS)
    assert re.findall(r".*-DGGML_METAL_NSQ.*", cmake) == ["            set(XC_NSQ_DEFS -DGGML_METAL_NSQ)"]
    assert "if (src IN_LIST METALLIB_NSQ_SOURCES)\n            set(XC_NSQ_DEFS -DGGML_METAL_NSQ)" in cmake
    for kind in NSQ_KINDS:
        assert '#include "nsq4.h"\n#include "nsq3.h"' in patched[f"ggml-metal/kernels/{kind}.metal"]


def hunks(old: str, new: str) -> list[list[str]]:
    """The changed lines of each hunk, changes within 3 lines of each other counting as one (as in the patches)."""
    a, b = old.splitlines(), new.splitlines()
    return [[ln for tag, i1, i2, j1, j2 in group if tag != "equal" for ln in a[i1:i2] + b[j1:j2]]
            for group in difflib.SequenceMatcher(None, a, b, autojunk=False).get_grouped_opcodes(3)]


def test_metal_diff_touches_only_nsq(pristine, patched):
    """Against the pristine sdist, the patched ggml-metal tree adds the NSQ types' own files, leaves every upstream
    kernel source and header as it was, and changes the shared files only in hunks about NSQ4 or NSQ3 (their
    registration, supports_op entries, the fallback that makes their libraries optional, the mixed K/V pair)."""
    metal = {rel for rel in patched if rel.startswith("ggml-metal/")}
    upstream = {rel for rel in pristine if rel.startswith("ggml-metal/")}
    assert upstream <= metal
    assert metal - upstream == NSQ_FILES
    changed = {rel for rel in upstream if patched[rel] != pristine[rel]}
    assert changed <= SHARED_FILES, f"upstream Metal files changed outside the allowlist: {changed - SHARED_FILES}"
    assert not any(rel.startswith("ggml-metal/kernels/") for rel in changed)
    for rel in sorted(changed):
        for hunk in hunks(pristine[rel], patched[rel]):
            assert "nsq" in "\n".join(hunk).lower(), f"{rel}: a change that is not about NSQ:\n" + "\n".join(hunk)


def kernel_text(source: str, name: str) -> str:
    """A kernel's parameters and body, whitespace collapsed."""
    m = re.search(r"^kernel void " + name + r"\(", source, re.M)
    assert m, f"no kernel {name}"
    depth, end = 0, source.index("{", m.end())
    for end in range(end, len(source)):
        depth += {"{": 1, "}": -1}.get(source[end], 0)
        if depth == 0:
            break
    return re.sub(r"\s+", " ", source[m.end() - 1:end + 1])


# NSQ4's kernel in nsq.metal, the upstream template it stands in for, its file, and the template arguments
NSQ4_TEMPLATES = [
    ("kernel_set_rows_f32_nsq4", "kernel_set_rows_q", "quantize.metal",
     {"TS": "float", "QK": "QK_NSQ4", "block_q": "block_nsq4", "quantize_func": "quantize_nsq4"}),
    ("kernel_cpy_f32_nsq4", "kernel_cpy_f32_q", "quantize.metal",
     {"QK": "QK_NSQ4", "block_q": "block_nsq4", "quantize_func": "quantize_nsq4"}),
    ("kernel_cpy_nsq4_f", "kernel_cpy_q_f32", "quantize.metal",
     {"block_q": "block_nsq4", "nl": "4", "dequantize_func": "dequantize_nsq4"}),
    ("kernel_get_rows_nsq4", "kernel_get_rows_q", "quantize.metal",
     {"block_q": "block_nsq4", "nl": "4", "dequantize_func": "dequantize_nsq4"}),
    ("kernel_flash_attn_ext_kv_nsq4_f16", "kernel_flash_attn_ext_kv_f16", "fa_aux.metal",
     {"block_t": "block_nsq4", "QK": "QK_NSQ4", "deq_t4x4": "dequantize_nsq4"}),
]


def for_nsq3(entry):
    ours, template, file, args = entry
    return (ours.replace("nsq4", "nsq3"), template, file,
            {param: arg.replace("nsq4", "nsq3").replace("NSQ4", "NSQ3") for param, arg in args.items()})


# NSQ3's, in the same library: the same templates with NSQ3's block, QK_NSQ3 and block functions (nl = 4 too)
TEMPLATES = NSQ4_TEMPLATES + [for_nsq3(entry) for entry in NSQ4_TEMPLATES]


def template_with_args(pristine: Files, template: str, file: str, args: dict[str, str]) -> str:
    want = kernel_text(pristine[f"ggml-metal/kernels/{file}"], template)
    for param, arg in args.items():
        want = re.sub(r"\b" + param + r"\b", arg, want)
    return want


@pytest.mark.parametrize("ours,template,file,args", TEMPLATES, ids=[t[0] for t in TEMPLATES])
def test_nsq_kernels_follow_upstreams_templates(pristine, patched, ours, template, file, args):
    """The set_rows/cpy/get_rows/F16 pre-conversion kernels of NSQ4 and NSQ3 are upstream's templates with the
    type's arguments substituted, token for token: ggml-metal-ops.cpp dispatches them with the same arguments and
    grid."""
    want = template_with_args(pristine, template, file, args)
    assert kernel_text(patched["ggml-metal/kernels/nsq.metal"], ours) == want


def test_a_kernel_off_its_template_would_be_caught(pristine, patched):
    """Negative control: NSQ3's get_rows kernel indexing its blocks as if they held 32 values differs from the
    template with NSQ3's arguments."""
    ours, template, file, args = for_nsq3(NSQ4_TEMPLATES[3])
    assert ours == "kernel_get_rows_nsq3"
    source = patched["ggml-metal/kernels/nsq.metal"]
    good = kernel_text(source, ours)
    assert good.count("psrc + ind/4, ind%4") == 1
    broken = source.replace(good.split("{", 1)[1][:0] + "dequantize_nsq3(psrc + ind/4, ind%4, temp)",
                            "dequantize_nsq3(psrc + ind/2, ind%2, temp)")
    assert kernel_text(broken, ours) != template_with_args(pristine, template, file, args)


def syntax_check_host(cxx: str, upstream: Path, source: Path) -> subprocess.CompletedProcess:
    ggml = upstream / "vendor/llama.cpp/ggml"
    cmd = [cxx, "-std=c++17", "-fsyntax-only", "-w", "-I", str(ggml / "include"), "-I", str(ggml / "src"),
           "-I", str(ggml / "src/ggml-metal"), str(source)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("name", ["ggml-metal-device.cpp", "ggml-metal-ops.cpp"])
def test_metal_host_cpp_compiles(upstream_tree, cxx, name):
    """The C++ of ggml-metal that the patches change (the mixed K/V pair's kernel names and V's own F16
    pre-conversion) compiles on the host (g++ -fsyntax-only: it needs no Apple header)."""
    proc = syntax_check_host(cxx, upstream_tree, upstream_tree / SRC / "ggml-metal" / name)
    assert proc.returncode == 0, proc.stderr


def test_metal_host_cpp_check_catches_a_wrong_call(upstream_tree, cxx, tmp_path):
    """Negative control: ggml-metal-ops.cpp calling the F16 pre-conversion's getter without saying K or V (its
    arity before the NSQ3 patch) does not compile."""
    text = (upstream_tree / SRC / "ggml-metal" / "ggml-metal-ops.cpp").read_text()
    call = "ggml_metal_library_get_pipeline_flash_attn_ext_kv_f16(lib, op, 2)"
    assert text.count(call) == 1
    broken = tmp_path / "ggml-metal-ops.cpp"
    broken.write_text(text.replace(call, "ggml_metal_library_get_pipeline_flash_attn_ext_kv_f16(lib, op)"))
    proc = syntax_check_host(cxx, upstream_tree, broken)
    assert proc.returncode != 0 and "ggml_metal_library_get_pipeline_flash_attn_ext_kv_f16" in proc.stderr
