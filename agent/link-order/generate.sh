#!/usr/bin/env bash
# Regenerates agent/link-order/hot-functions.txt: the functions the agent
# and the CA execute while starting, publishing, rotating and idling, as
# globs over symbol names without their build-specific hashes.
#
# The linker places these functions next to each other, in .text.hot
# before .text (see agent/link-order/link_args.rs). The kernel maps a
# binary's code in 64 KB blocks around each page that runs; with the
# functions an idle agent runs spread over 15 MB of .text, it kept about
# 5 MB of code resident. Packed together they take about a megabyte.
#
# Run this again after larger code changes: names that no longer exist
# match nothing and cost only locality; the idle RSS the bench prints shows
# when the list has gone stale.
#
# Needs: valgrind, python3, ss (iproute2), root (the bench mounts tmpfs),
# and the release binaries: cargo build --release -p credlet-tests --bins
# KEEP_WORK=1 keeps the profiles and prints where they are.
set -euo pipefail
cd "$(dirname "$0")/../.."

target_dir="${CARGO_TARGET_DIR:-target}"
agent="$(realpath "$target_dir/release/credlet-under-test")"
bench="$(realpath "$target_dir/release/credlet-bench")"
for f in "$agent" "$bench"; do
  [[ -x "$f" ]] || { echo "missing $f: cargo build --release -p credlet-tests --bins" >&2; exit 1; }
done
command -v valgrind > /dev/null || { echo "valgrind not found (apt-get install valgrind)" >&2; exit 1; }

work="$(mktemp -d)"
if [[ -n "${KEEP_WORK:-}" ]]; then
  echo "profiles kept in $work" >&2
else
  trap 'rm -rf "$work"' EXIT
fi
mkdir "$work/bin" "$work/profiles"
# The bench starts the `credlet-under-test` next to itself: a wrapper that
# runs the real binary under callgrind, one profile per process.
cp "$bench" "$work/bin/credlet-bench"
cat > "$work/bin/credlet-under-test" <<WRAPPER
#!/bin/sh
exec valgrind --quiet --tool=callgrind --demangle=no --vgdb-prefix="$work/vgdb" \
  --callgrind-out-file="$work/profiles/callgrind.%p" "$agent" "\$@"
WRAPPER
chmod +x "$work/bin/credlet-under-test"

# What an idle agent runs is what it keeps resident: the bench's agent
# starts, answers the readiness Probe and idles for 2 s before it measures
# memory; a dump at that point splits its profile into start-up and idle
# (`<profile>.1`) and serving (`<profile>`).
CREDLET_BENCH_VOLUMES=20 CREDLET_BENCH_CONCURRENCY=4 "$work/bin/credlet-bench" csi-rotation \
  > "$work/csi-rotation.log" 2>&1 &
bench_pid=$!
agent_pid=
for _ in $(seq 600); do
  agent_pid="$(pgrep -f "callgrind.*credlet-under-test agent" | head -1 || true)"
  [[ -n "$agent_pid" ]] && break
  sleep 0.1
done
[[ -n "$agent_pid" ]] || { echo "the bench started no agent" >&2; exit 1; }
# Ready: listening on its CSI socket (asked of the kernel, as the socket
# lives on the bench's own mount).
listening() { ss -xlpH | grep -q "pid=$agent_pid,"; }
for _ in $(seq 600); do listening && break; sleep 0.1; done
listening || { echo "the agent under callgrind never listened" >&2; exit 1; }
sleep 1.5
callgrind_control --vgdb-prefix="$work/vgdb" --dump "$agent_pid" > /dev/null 2>&1
wait "$bench_pid" || { cat "$work/csi-rotation.log" >&2; exit 1; }

# The agent against `credlet ca` over mTLS: the remote issuer, and the CA.
# Its start-up and idling (bootstrap with its token, the client
# certificate, the trust bundle stream) belong to the idle group too: the
# bench idles 5 s after the agent is ready, and a dump 3 s after it listens
# falls in that pause.
CREDLET_BENCH_VOLUMES=20 CREDLET_BENCH_CONCURRENCY=4 "$work/bin/credlet-bench" csi-rotation-remote \
  > "$work/csi-rotation-remote.log" 2>&1 &
bench_pid=$!
first_agent="$agent_pid"
agent_pid=
for _ in $(seq 600); do
  agent_pid="$(pgrep -f "callgrind.*credlet-under-test agent" | grep -vx "$first_agent" | head -1 || true)"
  [[ -n "$agent_pid" ]] && break
  sleep 0.1
done
[[ -n "$agent_pid" ]] || { echo "the remote bench started no agent" >&2; exit 1; }
for _ in $(seq 600); do listening && break; sleep 0.1; done
listening || { echo "the remote agent under callgrind never listened" >&2; exit 1; }
sleep 3
callgrind_control --vgdb-prefix="$work/vgdb" --dump "$agent_pid" > /dev/null 2>&1
wait "$bench_pid" || { cat "$work/csi-rotation-remote.log" >&2; exit 1; }

nm --defined-only --print-size "$agent" > "$work/symbols"
# Symbols of assembly objects (their functions share one `.text`, so the
# linker can place only the whole object): from the symbol tables of the
# archives the binary was linked from.
for archive in "$target_dir"/release/deps/*.rlib; do
  objdump -t "$archive" 2> /dev/null || true
done > "$work/archive-symbols"
python3 - "$work/profiles" "$work/symbols" "$work/archive-symbols" > agent/link-order/hot-functions.txt <<'PY'
"""Prints globs for the agent binary's functions that the profiles saw
executed, in six groups: what the agent ran starting and idling, then
the whole families of the generic functions among it; the same two for
what it ran serving the bench, and for what only the CA ran.

A glob drops the hashes in a symbol name: they depend on the compiler,
the target, the flags and every dependency's version, so the list keeps
working for other builds of the same code. Without its hash a generic
function's glob matches all of its instances; a glob whose other
instances add more than OVERMATCH bytes of code that never ran goes to the
family group, after the code that ran, so it does not dilute it.

Identical functions are merged by the compiler: one body, several names.
Whichever name the profile shows, every name at that address is listed,
so the glob for the body's own section is among them."""
import bisect, collections, fnmatch, os, re, sys

OVERMATCH = 4 * 1024
profiles, symbols_path, archive_symbols_path = sys.argv[1:4]

# Symbol -> "object:<member name without its build hash>" for functions
# in a plain `.text` (assembly; compiled code has one section per
# function). objdump prints "<member>:     file format ..." before each
# member's table, and "<address> <flags> <section>\t<size> [.hidden] <name>"
# rows.
object_of = {}
member = None
for line in open(archive_symbols_path, errors='replace'):
    if ':     file format' in line:
        member = re.sub(r'^[0-9a-f]{16}-', '', line.split(':', 1)[0].strip())
        continue
    left, tab, right = line.rstrip('\n').partition('\t')
    fields = left.split()
    if member and tab and right.split() and fields[-1:] == ['.text'] and 'F' in fields[1:-1]:
        object_of.setdefault(right.split()[-1], 'object:' + member)

sizes, address_of, names_at = {}, {}, collections.defaultdict(list)
for line in open(symbols_path):
    fields = line.split()
    if len(fields) == 4 and fields[2] in 'tTwW':
        address, size, name = int(fields[0], 16), int(fields[1], 16), fields[3]
        sizes[name] = size
        address_of[name] = address
        names_at[address].append(name)
names = sorted(sizes)

name_entry = re.compile(r"^c?fn=\(\d+\) (.*?)(?:'\d+)?$")


def process_of(path):
    """For an agent's profile up to the dump: 'idle' (embedded CA) or
    'remote-idle' (with --ca-url); else 'agent' or 'ca'."""
    for line in open(path, errors='replace'):
        if line.startswith('cmd:'):
            args = line.split()[2:]
            if args[:1] != ['agent']:
                return 'ca'
            if not path.endswith('.1'):
                return 'agent'
            return 'remote-idle' if '--ca-url' in args else 'idle'
    return 'ca'


# ring picks among variants of a primitive by CPU feature at run time.
# valgrind's CPU lacks ADX, AVX2 and VAES, so the profiles show the
# portable variants; the machine runs the others. Every variant of an
# executed one is listed with it.
# Longer suffixes first: '_vaes_avx2' before '_avx2'.
VARIANT_SUFFIXES = ['_generic_masked', '_vaes_avx2', '_ssse3_4x', '_nohw', '_adx',
                    '_avx2', '_hw', '_ssse3', '_clmul', '_avx', '_mulx']
# Assembly objects a variant runs that the profiled one did not: by a
# suffix of what was profiled (an object glob or a symbol).
VARIANT_OBJECTS = {
    'object:aesni-gcm-x86_64-elf.o': ['object:aes-gcm-avx2-x86_64-elf.o'],
    '_x25519_scalar_mult_adx': ['object:fiat_curve25519_adx_mul.o',
                                'object:fiat_curve25519_adx_square.o',
                                'fe4_*', 'fiat_25519_from_bytes'],
}
# Run natively at start-up but not seen under valgrind.
NATIVE_ONLY = ['__floattidf']


def cpu_variants(symbol):
    if not symbol.startswith('ring_core_'):
        return []
    stem = symbol
    for suffix in VARIANT_SUFFIXES:
        if symbol.endswith(suffix):
            stem = symbol[:-len(suffix)]
            break
    return [v for v in [stem] + [stem + s for s in VARIANT_SUFFIXES] if v in sizes and v != symbol]


PROCESSES = ['idle', 'remote-idle', 'agent', 'ca']
executed = []  # (process, symbol), each symbol once
seen = set()
paths = [os.path.join(profiles, name) for name in os.listdir(profiles)]
for path in sorted(paths, key=lambda p: (PROCESSES.index(process_of(p)), p)):
    process = process_of(path)
    for line in open(path, errors='replace'):
        m = name_entry.match(line.rstrip('\n'))
        if not m or m.group(1) not in sizes:
            continue
        for alias in names_at[address_of[m.group(1)]] + cpu_variants(m.group(1)):
            if alias not in seen:
                seen.add(alias)
                executed.append((process, alias))


def glob_of(symbol):
    if symbol in object_of:
        return object_of[symbol]
    symbol = re.sub(r'\.llvm\.\d+$', '', symbol)  # LTO's local suffix
    if symbol.startswith('_ZN'):
        return re.sub(r'17h[0-9a-f]{16}E$', '17h*', symbol)
    if symbol.startswith('_R'):
        return re.sub(r'Cs[0-9A-Za-z]+_', 'Cs*_', symbol) + '*'
    return symbol


def matched_size(glob):
    prefix = glob.split('*', 1)[0]
    pattern = re.compile(fnmatch.translate(glob))
    i, total = bisect.bisect_left(names, prefix), 0
    while i < len(names) and names[i].startswith(prefix):
        if pattern.match(names[i]):
            total += sizes[names[i]]
        i += 1
    return total


ran = collections.defaultdict(int)
first = {glob: ('idle', i) for i, glob in enumerate(NATIVE_ONLY)}
for process, symbol in executed:
    glob = glob_of(symbol)
    first.setdefault(glob, (process, len(first)))
    ran[glob] += sizes[symbol]
    for suffix, objects in VARIANT_OBJECTS.items():
        if glob.endswith(suffix):
            for obj in objects:
                first.setdefault(obj, (process, len(first)))

groups = collections.defaultdict(list)
for glob, (process, _) in sorted(first.items(), key=lambda item: item[1][1]):
    family = matched_size(glob) - ran[glob] > OVERMATCH
    groups[(process, family)].append(glob)

print('# Generated by agent/link-order/generate.sh; a "#" line starts a group.')
for key, title in [
    (('idle', False), 'executed by the agent starting and idling'),
    (('idle', True), 'generic families with instances the idle agent executed'),
    (('remote-idle', False), 'executed by the agent starting and idling with a remote CA only'),
    (('remote-idle', True), 'generic families with instances only that agent executed'),
    (('agent', False), 'executed by the agent serving'),
    (('agent', True), 'generic families with instances the agent executed'),
    (('ca', False), 'executed only by the CA'),
    (('ca', True), 'generic families with instances only the CA executed'),
]:
    # Inside a group the linker keeps the input order: sorted, the list
    # changes only where the code did.
    print('# ' + title)
    print('\n'.join(sorted(groups[key])))
PY
echo "$(grep -vc "^#" agent/link-order/hot-functions.txt) globs written to agent/link-order/hot-functions.txt"
