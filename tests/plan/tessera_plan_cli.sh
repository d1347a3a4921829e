#!/usr/bin/env bash
# tessera-plan's refusals of bad input (issue 15's fresh-user findings): each exits 2 at once
# with one line naming the bad value and the limit, before any long prediction, search or
# measurement. Usage: tessera_plan_cli.sh TESSERA_PLAN SOURCE_ROOT
set -euo pipefail
planner=$1
root=$2
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export OPENBLAS_NUM_THREADS=1
fail() { echo "FAIL: $*"; exit 1; }
cluster=$root/plan/clusters/selene_a100.json
model=(--layers 24 --hidden 2304 --heads 24 --vocab 51200 --seq 2048)

# expect CODE PATTERN ARGS...: tessera-plan ARGS exits CODE within 20 s and its stderr holds PATTERN.
expect() {
  local code=$1 pattern=$2
  shift 2
  local rc=0
  timeout 20 "$planner" "$@" > "$work/out.log" 2> "$work/err.log" || rc=$?
  [ "$rc" = "$code" ] || { cat "$work/out.log" "$work/err.log"; fail "exit $rc, not $code: tessera-plan $*"; }
  grep -qF -- "$pattern" "$work/err.log" || { cat "$work/err.log"; fail "no '$pattern' for: tessera-plan $*"; }
}

# Sizes above the planner's limits (they ran for minutes, or overflowed into the output).
expect 2 "layers 2147483647 is above the planner's limit 4096" plan --cluster "$cluster" --layers 2147483647 \
  --hidden 2304 --heads 24 --vocab 51200 --seq 2048 --batch 8
expect 2 "hidden 2147483520 is above the planner's limit 262144" plan --cluster "$cluster" --layers 24 \
  --hidden 2147483520 --heads 24 --vocab 51200 --seq 2048 --batch 8
expect 2 "hidden 2147483520 is above the planner's limit 262144" rank --cluster "$cluster" --layers 24 \
  --hidden 2147483520 --heads 24 --vocab 51200 --seq 2048 --world 8 --batch 8
expect 2 "ffn 2000000000 is above the planner's limit 1048576" plan --cluster "$cluster" "${model[@]}" --ffn 2000000000 --batch 8
expect 2 "vocab 16777217 is above the planner's limit 16777216" plan --cluster "$cluster" --layers 24 --hidden 2304 \
  --heads 24 --vocab 16777217 --seq 2048 --batch 8
expect 2 "pp 64 x virtual_stages 1 x 131072 micro-batches = 8388608 schedule units to replay, above the planner's limit 1048576" \
  timeline --cluster "$cluster" --layers 128 --hidden 2304 --heads 24 --vocab 51200 --seq 2048 --pp 64 --mbs 1 --batch 131072
"$planner" plan --help | grep -qF "at most 4096" || fail "plan --help does not state the layer limit"
"$planner" plan --help | grep -qF "1048576, the schedule units" || fail "plan --help does not state the replay limit"

# calibrate: refused before measuring.
expect 2 "--comm-kib: Value 1e7 not in range 0.001000 to 262144" calibrate --comm-kib 1e7
expect 2 "calibrate: --min-time must be a number of seconds in [1e-6, 3600], got nan" calibrate --min-time nan
expect 2 "--min-time: Value inf not in range" calibrate --min-time inf
expect 2 "--min-time: Value 0 not in range" calibrate --min-time 0
# One message size: the fit failed after the measuring and left an empty --out file behind.
expect 2 "calibrate: --comm-kib needs at least 2 different sizes" calibrate --comm-kib 1 --out "$work/cal.json"
expect 2 "calibrate: --comm-kib needs at least 2 different sizes" calibrate --comm-kib 4 --comm-kib 4
[ -e "$work/cal.json" ] && fail "a refused calibrate left --out behind"

# A model file's mistyped key is named.
echo '{"layers": 2, "hidden": 64, "heads": 4, "vocab": 100, "seq": 32, "tied": "yes"}' > "$work/model.json"
expect 2 "model file '$work/model.json': tied must be true or false, got \"yes\"" plan --cluster "$cluster" \
  --model "$work/model.json" --batch 8

# A cluster file's bad value as written, and an unknown key.
python3 - "$cluster" "$work" <<'PY'
import json, sys
c = json.load(open(sys.argv[1]))
c["device_memory_gib"] = -80
json.dump(c, open(sys.argv[2] + "/neg.json", "w"))
c["device_memory_gib"] = 80
c["peak_tflop"] = 312
json.dump(c, open(sys.argv[2] + "/typo.json", "w"))
PY
expect 2 "device_memory_gib must be > 0, got -80" plan --cluster "$work/neg.json" "${model[@]}" --batch 8
expect 2 "unknown key 'peak_tflop'" plan --cluster "$work/typo.json" "${model[@]}" --batch 8

# validate: rows files that cannot be validated.
rows=$root/plan/validation/published_rows.json
python3 - "$rows" "$work" <<'PY'
import json, sys
doc = json.load(open(sys.argv[1]))
out = sys.argv[2]
json.dump(dict(doc, rows=[]), open(out + "/empty.json", "w"))
bad = json.loads(json.dumps(doc)); bad["rows"][1]["iteration_s"] = 0
json.dump(bad, open(out + "/zero.json", "w"))
bad = json.loads(json.dumps(doc)); bad["rows"][2]["gpus"] = 1000
json.dump(bad, open(out + "/gpus.json", "w"))
# A row's key of the wrong type or range (session 18: nlohmann's message without the row or
# key, or the Layout's, exit 1).
for name, key, value in [("tp", "tp", "abc"), ("batch", "global_batch", 0), ("rc", "recompute", "sometimes"),
                         ("nolayers", "layers", None)]:
    bad = json.loads(json.dumps(doc))
    if value is None: del bad["rows"][0][key]
    else: bad["rows"][0][key] = value
    json.dump(bad, open(out + "/" + name + ".json", "w"))
PY
expect 2 'row C1: tp must be an integer from 1 to 2^30, got "abc"' validate "$work/tp.json" --clusters "$root/plan/clusters"
expect 2 "row C1: global_batch must be an integer from 1 to 2^30, got 0" validate "$work/batch.json" --clusters "$root/plan/clusters"
expect 2 'row C1: recompute must be null, "none", "selective" or "full", got "sometimes"' validate "$work/rc.json" \
  --clusters "$root/plan/clusters"
expect 2 "row C1: layers must be an integer from 1 to 2^30, got nothing (the key is missing)" validate "$work/nolayers.json" \
  --clusters "$root/plan/clusters"
expect 2 "has no rows" validate "$work/empty.json" --clusters "$root/plan/clusters"
expect 2 "row C2: iteration_s must be > 0 seconds (or null: no published time), got 0" validate "$work/zero.json" \
  --clusters "$root/plan/clusters"
expect 2 "row C3: gpus 1000 is not tp x pp x dp = 8 x 8 x 24 = 1536" validate "$work/gpus.json" --clusters "$root/plan/clusters"
printf '| row | gpus |\n|---|---|\n| C1 | 32 |\n' > "$work/rows.md"
expect 2 "validate reads a rows JSON file like plan/validation/published_rows.json" validate "$work/rows.md"
cp "$rows" "$work/copied.json"
expect 2 "give --clusters plan/clusters when the rows file was copied elsewhere" validate "$work/copied.json"
"$planner" validate "$work/copied.json" --clusters "$root/plan/clusters" > /dev/null || fail "validate --clusters"
# Lower priority findings: the interleaved schedule's micro-batch rule in the user's terms (it
# exited 1 naming the schedule's internal "group"), and notes for ZeRO at dp 1 and a ZeRO-3 unit
# larger than a stage.
expect 2 "interleaving (--v 2) needs the micro-batch count 6 (--batch / (dp x mbs)) to be a multiple of --pp 4" \
  plan --cluster "$cluster" "${model[@]}" --pp 4 --v 2 --batch 6
"$planner" plan --cluster "$cluster" "${model[@]}" --dp 1 --zero 3 --batch 8 2> "$work/err.log" > /dev/null
grep -qF "note: --zero 3 at dp 1: one replica has nothing to shard over" "$work/err.log" || fail "no note for --dp 1 --zero 3"
"$planner" plan --cluster "$cluster" "${model[@]}" --dp 2 --zero 3 --zero3-unit 100 --batch 8 2> "$work/err.log" > /dev/null
grep -qF "note: --zero3-unit 100 is more than the 24 layers of a pipeline stage" "$work/err.log" ||
  fail "no note for --zero3-unit 100"
echo "ok: tessera-plan refuses bad input with exit code 2 and the limit"
