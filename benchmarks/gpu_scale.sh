#!/usr/bin/env bash
# Scaling past two GPUs (issue 12). Run from the repo root on a machine with 4 or 8 GPUs, the project importable
# (PYTHONPATH=$PWD) and, for ZeRO, DeepSpeed's wheel installed. Each part fits one 10-minute device call on 8 H200s.
#
#   bash benchmarks/gpu_scale.sh dp    OUTDIR   # GPT-2 124M (vocabulary 50257, 16x1024 packed tokens per GPU, bf16), the
#                                          # loop's fast path, under DDP and FSDP2 on 1, 2, 4, 8 GPUs: tokens/s per
#                                          # GPU and scaling efficiency = tokens/s at N / (N x tokens/s at 1)
#   bash benchmarks/gpu_scale.sh xl    OUTDIR   # a GPT-2-XL-shaped 1.5B model under FSDP2, ZeRO-2 and ZeRO-3 on 4 and 8
#                                          # GPUs: tokens/s per GPU and peak memory per GPU
#   bash benchmarks/gpu_scale.sh nodes OUTDIR   # two "nodes" of G/2 GPUs on this host (machine_rank 0 and 1, main process
#                                          # 127.0.0.1) against one node of G: the same per-step losses (fp32,
#                                          # dropout off, within 1e-6) and the throughput cost of the node boundary
#   bash benchmarks/gpu_scale.sh table OUTDIR   # the record tables (markdown) from what the parts above wrote (levers: against
#                                          # ONE_GPU_TOKENS, or dp's one-GPU DDP run in the same OUTDIR)
#   bash benchmarks/gpu_scale.sh levers OUTDIR  # the loop-fast GPT-2 step under DDP on GPUS, once per lever (an environment
#                                          # variable or job arguments, listed in the part): ms/step and tokens/s each
#   bash benchmarks/gpu_scale.sh ddp-at-one OUTDIR # on one GPU, the profiled loop-fast GPT-2 step plain and wrapped in DDP
#                                          # in a world of one process (what DDP costs before any communication)
#   bash benchmarks/gpu_scale.sh profile OUTDIR # where a DDP step's time goes: all-reduce bandwidth alone
#                                          # (benchmarks/allreduce_probe.py), then the loop-fast GPT-2 step profiled on 1 GPU
#                                          # and on GPUS (benchmarks/profile_ddp.py: compute busy, communication not
#                                          # overlapped, idle; EXTRA adds job arguments, e.g. --ddp_bucket_cap_mb 100)
#
# GPUS (default: every visible GPU), SIZES (default: 1 2 4 8, up to GPUS), TOPOLOGIES (default: all of the part's),
# STEPS (default 40), RUN_TIMEOUT (default 300 s for any one launch; longer is a failure) and EXTRA (more job arguments for every run, e.g. a smaller model and --use_cpu true for a dry
# run on CPU processes; accelerate applies FSDP on GPUs only, so there the fsdp2 runs are DDP) can be set.
# Exits non-zero when a run fails or the two-node losses differ; a missed scaling target is reported, not failed.
set -uo pipefail
what=$1; out=$2; mkdir -p "$out"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
GPUS=${GPUS:-$(python -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)}
STEPS=${STEPS:-40}
read -r -a EXTRA <<< "${EXTRA:-}"
declare -A CFG=([ddp]=multi_gpu_ddp [fsdp2]=fsdp2 [zero2]=deepspeed_zero2 [zero3]=deepspeed_zero3)
LAUNCH=(timeout -k 10 "${RUN_TIMEOUT:-300}" accelerate launch)  # a hung collective must not eat the call
XL='{"n_embd": 1600, "n_layer": 48, "n_head": 25, "n_positions": 1024, "vocab_size": 50257}'
fail=0
RUN_ENV=(X=1)  # environment assignments for bench's launch (the levers part sets them per lever)

bench() {  # bench NAME TOPOLOGY N [bench arguments]: one `loop bench` run into $out/NAME (bench.json)
  local name=$1 t=$2 n=$3; shift 3
  echo "== $name: $t on $n GPU(s)"  # 1 GPU runs the topology's own code path too: efficiency measures scaling only
  env "${RUN_ENV[@]}" "${LAUNCH[@]}" --config_file launch_configs/${CFG[$t]}.yaml --num_processes "$n" \
    --main_process_port 29571 -m loop bench --workload gpt2-124m --steps "$STEPS" "$@" "${EXTRA[@]}" \
    --output_dir "$out/$name" < /dev/null > "$out/$name.log" 2>&1 || { echo "$name: FAILED (exit $?; out of memory?)"; tail -5 "$out/$name.log"; fail=1; return; }
  grep -A3 '^side' "$out/$name.log"
}

profile() {  # profile NAME N [job arguments]: benchmarks/profile_ddp.py on N GPUs (RUN_ENV as for bench) into $out/NAME.log
  local name=$1 n=$2; shift 2
  echo "== $name: $n GPU(s) ${RUN_ENV[*]} $*"
  env "${RUN_ENV[@]}" "${LAUNCH[@]}" --config_file launch_configs/multi_gpu_ddp.yaml --num_processes "$n" \
    --main_process_port 29583 benchmarks/profile_ddp.py "$@" "${EXTRA[@]}" > "$out/$name.log" 2>&1 \
    || { echo "$name: FAILED"; tail -5 "$out/$name.log"; fail=1; return; }
  grep -v -e '^{' -e 'Loading weights' -e 'tokenizing' "$out/$name.log" | grep -B1 -A28 'ms/step unprofiled' | head -31
}

case $what in
dp)
  for t in ${TOPOLOGIES:-ddp fsdp2}; do
    for n in ${SIZES:-1 2 4 8}; do
      [ "$n" -le "$GPUS" ] && bench "dp-$t-$n" $t $n --sides loop-fast
    done
  done ;;
xl)
  for t in ${TOPOLOGIES:-fsdp2 zero2 zero3}; do
    for n in ${SIZES:-4 8}; do
      [ "$n" -le "$GPUS" ] && bench "xl-$t-$n" $t $n --sides loop --model_config "$XL" --per_device_train_batch_size 4
    done
  done ;;
nodes)
  half=$((GPUS / 2)); first=$(seq -s, 0 $((half - 1))); second=$(seq -s, $half $((GPUS - 1)))
  JOB=(--config tasks/configs/gpt2_124m.yaml --disable_tqdm --bf16 false --logging_steps 1 --max_docs 300
       --dataloader_num_workers 0 --max_steps 30 --per_device_train_batch_size 4 --eval_strategy no
       --save_strategy no --model_config '{"n_embd": 768, "n_layer": 12, "n_head": 12, "n_positions": 1024,
       "vocab_size": 50257, "resid_pdrop": 0, "embd_pdrop": 0, "attn_pdrop": 0}' "${EXTRA[@]}")
  "${LAUNCH[@]}" --config_file launch_configs/multi_gpu_ddp.yaml --num_processes "$GPUS" tests/workers/gpu_worker.py \
    "${JOB[@]}" --output_dir "$out/one-node" > "$out/one-node.log" 2>&1 || { echo "one node: FAILED"; fail=1; }
  for r in 0 1; do
    devices=$first; [ $r = 1 ] && devices=$second
    CUDA_VISIBLE_DEVICES=$devices "${LAUNCH[@]}" --config_file launch_configs/multi_node.yaml \
      --num_processes "$GPUS" --num_machines 2 --machine_rank $r --main_process_ip 127.0.0.1 \
      --main_process_port 29581 tests/workers/gpu_worker.py "${JOB[@]}" --output_dir "$out/two-nodes" \
      > "$out/two-nodes-$r.log" 2>&1 &
  done
  wait || true
  python - "$out" <<'PY' || fail=1
import json, statistics, sys
out = sys.argv[1]
a, b = ([r for r in json.load(open(f"{out}/{d}/result.json")) if "loss" in r] for d in ("one-node", "two-nodes"))
worst = max(abs(x[k] - y[k]) / max(abs(x[k]), 1e-12) for x, y in zip(a, b) for k in ("loss", "grad_norm"))
rate = lambda rows: statistics.median(r["loop/tokens_per_second"] for r in rows[5:] if "loop/tokens_per_second" in r)
ok = len(a) == len(b) == 30 and worst <= 1e-6
print(f"two nodes vs one node: {len(b)} logged steps, max rel diff (loss, grad_norm) {worst:.2e} (tolerance 1e-6) -> "
      f"{'OK' if ok else 'FAILED'}; tokens/s (fp32, median after step 5): one node {rate(a):,.0f}, two nodes "
      f"{rate(b):,.0f} ({100 * (rate(b) / rate(a) - 1):+.1f}%)")
json.dump({"max_rel_diff": worst, "one_node_tokens_per_second": rate(a), "two_nodes_tokens_per_second": rate(b)},
          open(f"{out}/nodes.json", "w"))
sys.exit(0 if ok else 1)
PY
  ;;
table)
  python - "$out" <<'PY'
import glob, json, os, sys
out = sys.argv[1]
gb = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731 (no peak memory on a CPU)
runs = {}
for path in glob.glob(f"{out}/*/bench.json"):
    report = json.load(open(path))
    side = report["sides"][0]
    runs[os.path.basename(os.path.dirname(path))] = (report["device"], side)
if not runs:
    sys.exit("no bench.json under " + out)
print(f"device: {next(iter(runs.values()))[0]}\n")
print("| GPT-2 124M, loop-fast | GPUs | tokens/s (all) | tokens/s per GPU | scaling efficiency | peak GB per GPU |")
print("|---|---|---|---|---|---|")
for t, target in (("ddp", 0.95), ("fsdp2", 0.90)):
    one = runs.get(f"dp-{t}-1")
    for n in (1, 2, 4, 8):
        if f"dp-{t}-{n}" not in runs:
            continue
        s = runs[f"dp-{t}-{n}"][1]
        eff = s["tokens_per_second"] / (n * one[1]["tokens_per_second"]) if one else None
        mark = "" if eff is None or n == 1 else (" (target %d%%: %s)" % (100 * target, "met" if eff >= target else "MISSED"))
        print(f"| {t} | {n} | {s['tokens_per_second']:,.0f} | {s['tokens_per_second'] / n:,.0f} | "
              f"{'-' if eff is None else f'{100 * eff:.1f}%'}{mark} | {gb(s['peak_memory_gb'])} |")
print("\n| 1.5B GPT-2-XL shape, loop | GPUs | tokens/s per GPU | peak GB per GPU |")
print("|---|---|---|---|")
for t in ("fsdp2", "zero2", "zero3"):
    for n in (1, 2, 4, 8):
        if f"xl-{t}-{n}" in runs:
            s = runs[f"xl-{t}-{n}"][1]
            print(f"| {t} | {n} | {s['tokens_per_second'] / n:,.0f} | {gb(s['peak_memory_gb'])} |")
levers = sorted(k for k in runs if k.startswith("lever-"))
if levers:  # against one GPU's tokens/s: ONE_GPU_TOKENS, or the dp part's one-GPU DDP run in the same OUTDIR
    one = float(os.environ.get("ONE_GPU_TOKENS") or runs.get("dp-ddp-1", (None, {}))[1].get("tokens_per_second") or 0)
    print(f"\n| lever (DDP, loop-fast GPT-2 124M) | ms/step | tokens/s (all GPUs) | x one GPU ({one:,.0f} tokens/s) |")
    print("|---|---|---|---|")
    for k in sorted(levers, key=lambda k: -(runs[k][1]["tokens_per_second"] or 0)):
        s = runs[k][1]
        times = f"{s['tokens_per_second'] / one:.2f}" if one else "-"
        print(f"| {k[len('lever-'):]} | {s['ms_per_step']:.1f} | {s['tokens_per_second']:,.0f} | {times} |")
PY
  ;;
levers)  # each line: a name, environment assignments (comma-separated; X=1: none), job arguments. LEVERS="a b" picks some
  while read -r name env args; do
    [ -n "${LEVERS:-}" ] && [[ " $LEVERS " != *" $name "* ]] && continue
    echo "== lever $name: $env $args"
    IFS=, read -r -a RUN_ENV <<< "$env"; read -r -a more <<< "$args"
    bench "lever-$name" ddp "$GPUS" --sides loop-fast "${more[@]}"
  done <<'END_OF_LEVERS'
base X=1
no-overlap-one-bucket X=1 --ddp_compile_overlap false --ddp_bucket_cap_mb 1000
nccl-high-priority TORCH_NCCL_HIGH_PRIORITY=1
high-priority-250mb TORCH_NCCL_HIGH_PRIORITY=1 --ddp_bucket_cap_mb 250
8-channels-high-priority NCCL_MAX_NCHANNELS=8,TORCH_NCCL_HIGH_PRIORITY=1
nccl-simple NCCL_PROTO=Simple
buckets-100mb X=1 --ddp_bucket_cap_mb 100
no-overlap X=1 --ddp_compile_overlap false
static-graph X=1 --ddp_static_graph true
END_OF_LEVERS
  ;;
profile)
  torchrun --nproc_per_node "$GPUS" --master_port 29582 benchmarks/allreduce_probe.py 2>&1 | grep all_reduce || fail=1
  for n in 1 "$GPUS"; do  # one GPU without the recorded step (DDP cannot record it; it costs nothing at this size)
    one=(); [ "$n" = 1 ] && one=(--cuda_graph_step false)
    profile "profile-$n" "$n" "${one[@]}"
  done ;;
ddp-at-one)  # one GPU: the step plain, then wrapped in DDP in a world of one process (DDP_AT_ONE=1, see
             # benchmarks/profile_ddp.py): what DDP's reducer, buckets and dynamo's graph split cost before any link does.
             # Lines as in levers (LEVERS="a b" picks some).
  while read -r name env args; do
    [ -n "${LEVERS:-}" ] && [[ " $LEVERS " != *" $name "* ]] && continue
    IFS=, read -r -a RUN_ENV <<< "$env"; read -r -a more <<< "$args"
    profile "ddp-at-one-$name" 1 --cuda_graph_step false "${more[@]}"
  done <<'END_OF_VARIANTS'
plain X=1
ddp DDP_AT_ONE=1
ddp-no-overlap DDP_AT_ONE=1 --ddp_compile_overlap false
ddp-no-overlap-one-bucket DDP_AT_ONE=1 --ddp_compile_overlap false --ddp_bucket_cap_mb 1000
ddp-static-graph DDP_AT_ONE=1 --ddp_static_graph true
END_OF_VARIANTS
  ;;
*) echo "usage: bash benchmarks/gpu_scale.sh dp|xl|nodes|table|levers|profile|ddp-at-one OUTDIR"; exit 2 ;;
esac
exit $fail
