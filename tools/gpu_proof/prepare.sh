#!/usr/bin/env bash
# Prepare the GPU proof's device calls, here (no GPU needed). See tools/gpu_proof/README.md.
#
#   bash tools/gpu_proof/prepare.sh            # wheels into .whl/, archive chunks into .gpu_data/, the calls
#
# 1. downloads the cp312 wheels the device lacks into .whl/ (the device README's recipe) and checks
#    that they resolve as one set against the device's package list;
# 2. splits the CIFAR-10 archive into chunks, .gpu_data/c<i>/{part,manifest.json}, so that each call's
#    carried tree stays under the 64 MiB limit, and writes its sha256 to
#    tools/gpu_proof/cifar-10-python.tar.gz.sha256 (travels with the tree);
# 3. prints the exact `run` calls (command, carry, timeout_s) and each call's size.
#
# Settings (environment): ARCHIVE (default $CIFAR10_ARCHIVE or ../shared/data/cifar-10-python.tar.gz),
# MARGIN_MIB (free space left in every call, default 1.5: the tool counts the bytes of the files that
#   travel, and this script refuses a call above 63 MiB; 3 MiB cost a fourth chunk call once the tree
#   reached 5.9 MiB; if `run` ever answers "larger than 64 MiB", rerun with MARGIN_MIB=3),
# CHUNKS (force a chunk count),
# BUDGETS ("B1 B2 ... BN": proof.py's seconds per chunk call; default 80 for the first, 10 (no measuring)
# between, 280 for the last chunk call).
# Idempotent: rerun it after the tree changed; chunks are rewritten only when their plan changes.
set -euo pipefail

ROOT=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
cd "$ROOT"
ARCHIVE=${ARCHIVE:-${CIFAR10_ARCHIVE:-$ROOT/../shared/data/cifar-10-python.tar.gz}}
MARGIN_MIB=${MARGIN_MIB:-1.5}
KINDS=${KINDS:-/work/.library/device/KINDS.md}
PY=${PY:-python3}

# What the device lacks (KINDS.md's package list: it has absl-py, attrs, h5py, markdown-it-py, mdurl,
# ml-dtypes, numpy, packaging, pandas, pygments, pyyaml, rich, scikit-learn, scipy, tabulate,
# typing-extensions): Keras and two of its requirements, jsonschema (cnnstudy.configuration) and its.
# The versions of this project's jaxenv (tests' JAX CPU environment), one of each.
WHEELS=(keras==3.15.1 optree==0.20.0 namex==0.1.0 jsonschema==4.26.0 jsonschema-specifications==2025.9.1
        referencing==0.37.0 rpds-py==2026.9.1)
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)

for line in /.whl/ /.gpu_data/; do
    grep -qxF "$line" .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo "$line" >> .git/info/exclude; }
done

echo "== 1. wheels (.whl/)"
mkdir -p .whl
for w in "${WHEELS[@]}"; do
    name=${w%%==*}; version=${w##*==}; stem=${name//-/_}
    if ! ls .whl/"$stem"-"$version"-*.whl >/dev/null 2>&1; then
        $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            "${PLATFORMS[@]}" -d .whl "$w" 2>&1 | grep -v "is ignored: it is neither" || true
    fi
    ls .whl/"$stem"-"$version"-*.whl >/dev/null 2>&1 || { echo "no wheel for $w (see pip's message above)" >&2; exit 1; }
done
# One version of each: two stop the whole install on the device.
ls .whl/*.whl | sed -E 's#.*/([^-]+)-.*#\1#' | tr 'A-Z-' 'a-z_' | sort | uniq -d | grep . \
    && { echo "two versions of the packages above in .whl/: remove one" >&2; exit 1; } || true
# Every requirement of every wheel is in .whl/ or on the device; and pip resolves the set for cp312.
$PY - "$KINDS" .whl <<'EOF'
import re, sys, zipfile, glob
from pathlib import Path
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
kinds = Path(sys.argv[1])
text = kinds.read_text() if kinds.is_file() else ""
m = re.search(r"Packages: (.*?)\.\n", text)
device = {norm(p.strip()) for p in m.group(1).split(",")} if m else set()
if not device:
    print(f"warning: no package list read from {kinds}: requirements not checked against the device")
wheels = {}
for path in sorted(glob.glob(f"{sys.argv[2]}/*.whl")):
    with zipfile.ZipFile(path) as z:
        meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    name = norm(re.search(r"^Name: (.+)$", meta, re.M).group(1))
    reqs = []
    for req in re.findall(r"^Requires-Dist: (.+)$", meta, re.M):
        spec, _, marker = req.partition(";")
        if "extra ==" in marker or "extra==" in marker:
            continue
        if "python_version" in marker and re.search(r'python_version\s*>=\s*"3\.1[3-9]"', marker):
            continue  # not for Python 3.12
        reqs.append(norm(re.match(r"[A-Za-z0-9_.\-]+", spec.strip()).group(0)))
    wheels[name] = reqs
missing = sorted({r for reqs in wheels.values() for r in reqs if r not in wheels and device and r not in device})
for name, reqs in wheels.items():
    print(f"  {name}: needs {', '.join(reqs) or 'nothing'}")
if missing:
    sys.exit(f"requirements neither in .whl/ nor on the device: {', '.join(missing)}")
print(f"  every requirement is in .whl/ or on the device ({len(device)} packages listed in {kinds.name})")
EOF
# pip's own resolution of the set, for CPython 3.12 on manylinux x86-64: what it would take from .whl/,
# and what from elsewhere (must all be on the device already).
rm -rf /tmp/gpu_proof_dryrun /tmp/gpu_proof_dryrun.json
$PY -m pip install -q --dry-run --ignore-installed --report /tmp/gpu_proof_dryrun.json --target /tmp/gpu_proof_dryrun \
    --python-version 3.12 --implementation cp "${PLATFORMS[@]}" --only-binary=:all: --find-links .whl "${WHEELS[@]}" \
    2>&1 | grep -v "is ignored: it is neither" || true
[ -s /tmp/gpu_proof_dryrun.json ] || { echo "pip could not resolve the set (above)" >&2; exit 1; }
$PY - "$KINDS" /tmp/gpu_proof_dryrun.json .whl <<'EOF'
import json, re, sys
from pathlib import Path
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
kinds = Path(sys.argv[1])
m = re.search(r"Packages: (.*?)\.\n", kinds.read_text()) if kinds.is_file() else None
device = {norm(p.strip()) for p in m.group(1).split(",")} if m else set()
carried = {f"{norm(w.name.split('-')[0])}=={w.name.split('-')[1]}" for w in Path(sys.argv[3]).glob("*.whl")}
report = json.load(open(sys.argv[2]))
local, other = [], []
for item in report["install"]:
    name, version = norm(item["metadata"]["name"]), item["metadata"]["version"]
    (local if f"{name}=={version}" in carried else other).append(f"{name}=={version}")
if len(local) != len(carried):
    sys.exit(f"pip's set takes {sorted(local)} of the carried wheels {sorted(carried)}: another version wins somewhere")
print("  pip resolves, from .whl/:", " ".join(sorted(local)))
print("  and from elsewhere (must be on the device):", " ".join(sorted(other)))
bad = [p for p in other if device and p.split("==")[0] not in device]
if bad:
    sys.exit(f"not on the device and not in .whl/: {' '.join(bad)}")
EOF
WHEEL_BYTES=$(du -cb .whl/*.whl | tail -1 | cut -f1)

echo "== 2. archive chunks (.gpu_data/)"
[ -f "$ARCHIVE" ] || { echo "no archive at $ARCHIVE (set ARCHIVE=...)" >&2; exit 1; }
# The tree that travels with every call: tracked files and untracked files git does not ignore.
TREE_BYTES=$(git ls-files -z --cached --others --exclude-standard | xargs -0 -r stat -c %s 2>/dev/null \
    | awk '{s+=$1} END {print s+0}')
echo "  tree that travels: $TREE_BYTES bytes ($(git ls-files --cached --others --exclude-standard | wc -l) files;" \
     "tracked alone: $(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1) bytes by du -cb)"
$PY - "$ARCHIVE" "$TREE_BYTES" "$WHEEL_BYTES" "$MARGIN_MIB" "${CHUNKS:-}" "${BUDGETS:-}" <<'EOF'
import hashlib, json, math, os, shutil, sys
from pathlib import Path
archive, tree, wheels, margin_mib, force, budgets = sys.argv[1:7]
tree, wheels, MiB = int(tree), int(wheels), 2**20
LIMIT, margin = 64 * MiB, float(margin_mib) * MiB
size = os.path.getsize(archive)
digest = hashlib.sha256(open(archive, "rb").read()).hexdigest()
cap1, cap = LIMIT - tree - wheels - margin, LIMIT - tree - margin  # call 1 also carries .whl/
if cap1 <= 0:
    sys.exit(f"the tree ({tree} B) and the wheels ({wheels} B) leave no room for data in call 1")
n = int(force) if force else (1 if size <= cap1 else 1 + math.ceil((size - cap1) / cap))
# Equal totals for every call: chunk 1 = x - wheels, the others x.
x = math.ceil((size + wheels) / n)
sizes = [x - wheels] + [x] * (n - 1)
sizes[-1] = size - sum(sizes[:-1])
if sizes[0] <= 0 or sizes[-1] <= 0:
    sys.exit(f"{n} chunk(s) do not split {size} B sensibly")
plan = {"archive": os.path.basename(archive), "archive_size": size, "archive_sha256": digest, "count": n, "sizes": sizes}
out = Path(".gpu_data")
old = json.loads((out / "plan.json").read_text()) if (out / "plan.json").is_file() else None
if old != plan:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    with open(archive, "rb") as fh:
        offset = 0
        for i, length in enumerate(sizes, start=1):
            data = fh.read(length)
            folder = out / f"c{i}"
            folder.mkdir()
            (folder / "part").write_bytes(data)
            manifest = {"index": i, "count": n, "offset": offset, "size": length, "sha256": hashlib.sha256(data).hexdigest(),
                        "archive": plan["archive"], "archive_size": size, "archive_sha256": digest}
            (folder / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
            offset += length
    (out / "plan.json").write_text(json.dumps(plan, indent=1, sort_keys=True))
Path("tools/gpu_proof/cifar-10-python.tar.gz.sha256").write_text(f"{digest}  {plan['archive']}\n")
b = [int(v) for v in budgets.split()] if budgets else ([80] + [10] * (n - 2) + [280] if n > 1 else [280])
if len(b) != n:
    sys.exit(f"BUDGETS gives {len(b)} values for {n} calls")
print(f"  {plan['archive']}: {size} B, sha256 {digest}, {n} chunk(s): {sizes}")
print()
print("== 3. the calls: make them back to back, with no pause to read the results (the machine stays warm 30 s")
print("   after a call; a cold one has lost the chunks sent before: then start again from call 1). Sizes: what travels.")
print("   Call 1 names the H200 where `status` lists it; drop its kind where not, or where no H200 starts (an H100).")
spent = 90  # the machine's start
for i in range(1, n + 1):
    folder = out / f"c{i}"
    carried = sum(p.stat().st_size for p in folder.iterdir()) + (wheels if i == 1 else 0)
    carry = ([".whl"] if i == 1 else []) + [f".gpu_data/c{i}"]
    last = i == n
    cmd = f"bash tools/gpu_proof/call.sh {i} {n} {b[i - 1]}" + (" data,a:60,b,c,a" if last else "")
    timeout = min(600, b[i - 1] + (45 if i == 1 else 35))
    total = tree + carried
    what = "last chunk: data, (a) 60 s, (b), (c), then (a)" if last else ("chunk; (a) meanwhile" if b[i - 1] >= 25 else "chunk only")
    print(f"\ncall {i} ({what}): {total / MiB:.1f} MiB travel (tree {tree / MiB:.1f} + carried {carried / MiB:.1f}), limit 64")
    print(json.dumps({"command": cmd, "carry": carry, "timeout_s": timeout} | ({"kind": "nvidia-h200"} if i == 1 else {})))
    if total > LIMIT - MiB:
        sys.exit(f"call {i} would carry {total} B: too close to the limit; rerun with CHUNKS={n + 1}")
    spent += timeout + 25
left = max(0, min(550, 900 - spent - 35 - 40))
print(f"\ncall {n + 1} (continuation, nothing carried: (b)/(c) if unfinished, (d) the study's runs, then (a)):"
      f" {tree / MiB:.1f} MiB travel. Its budget (third number): min(550, budget_left_s - 75) from `status` just before;"
      f" if every call before ran to its limit, {left}:")
print(json.dumps({"command": f"bash tools/gpu_proof/call.sh {n + 1} {n} {left} b,c,d,a", "carry": [], "timeout_s": left + 35}))
print(f"\nDevice time, every call to its limit: ~90 s start + calls + ~25 s between calls = ~{spent + left + 35} s of the 900."
      " Then give_back. To end with the last chunk call instead, give it the steps data,a:60,b,c,d,a and the budget"
      " min(550, budget_left_s - 75).")
EOF
