#!/usr/bin/env bash
# The 2-GPU checks of issue 10. Run from the repo root on a machine with 2 GPUs, the project importable
# (PYTHONPATH=$PWD) and, for ZeRO, DeepSpeed's wheel installed. Exits non-zero on any failure.
#
#   bash tests/gpu/gpu_multi.sh resume OUTDIR [ddp fsdp2 zero2 zero3]
#       For each topology: GPT-2 124M (vocabulary 50257, byte-level text; fp32, dropout off, EMA on except under
#       ZeRO-3, where it is refused) trains 12 steps uninterrupted; a second run is SIGKILLed after step 7, resumed
#       with 'latest', SIGKILLed again in the middle of writing checkpoint-9, and resumed again. Every logged loss,
#       grad norm and eval_ema_loss must equal the uninterrupted run's within 1e-6 relative; the final model and its
#       ema/ must load with from_pretrained. The topologies run at the same time (each on both GPUs, its own ports;
#       launch start-up is most of each run's time and 124M fits many times over); PARALLEL=0 runs them one after
#       another. NPROC=1 runs the same checks through one process (one GPU). SPREAD=1 runs each uninterrupted
#       reference twice and takes the larger of 1e-6 and that run-to-run spread as the tolerance (fp32 on a GPU is not
#       deterministic).
#   EXTRA_JOB="--full_determinism true" (or any job arguments) is added to every run of every part. RUN_TIMEOUT
#       (default 300 s) stops any one launch that runs longer (a hung collective), which counts as a failure. On a CPU:
#       EXTRA_JOB='--use_cpu true --max_docs 60 --model_config {"n_embd":32,"n_layer":2,"n_head":2,"n_positions":1024,
#       "vocab_size":257,"resid_pdrop":0,"embd_pdrop":0,"attn_pdrop":0}' (one line, no spaces) runs resume ddp fsdp2
#       and checks in a few minutes.
#   bash tests/gpu/gpu_multi.sh checks OUTDIR
#       At the same time: data-parallel equivalence (1 GPU, batch 4, accumulation 2 vs 2 GPUs, batch 4, accumulation
#       1; 30 steps, per-step loss within 1e-5 relative); two one-GPU "nodes" on this host
#       (launch_configs/multi_node.yaml, main process 127.0.0.1) vs one node of 2 (the same losses); `loop compare`
#       under DDP and FSDP2 (deterministic kernels on both sides; the verdict is judged, the speed columns of
#       concurrent runs mean nothing).
#   bash tests/gpu/gpu_multi.sh shard OUTDIR
#       The sharding table, one run at a time: `loop bench` (loop side, 20 steps) on GPT-2 124M and a GPT-2-XL-shaped
#       1.5B model on 1 GPU, DDP, FSDP2, ZeRO-2 and ZeRO-3. MODELS="gpt2-124m" or "gpt2-xl" for one model only,
#       TOPOLOGIES="one ddp fsdp2 zero2 zero3" (all by default) for some rows.
#   bash tests/gpu/gpu_multi.sh zero OUTDIR
#       The gradient-exchange table (issue 28): `loop bench` (loop-fast, 40 steps; WORKLOAD, ZERO_SIDES, ZERO_STEPS) on
#       1 GPU, then on 2 under DDP as it is, with sharded_optimizer, with it and grad_reduce_dtype bf16, and DDP with
#       grad_reduce_dtype bf16: ms a step, tokens/s, x one GPU, memory a GPU. `resume OUT sharded` is the sharded
#       optimizer's kill-and-resume check (DDP plus --sharded_optimizer true).
#   bash tests/gpu/gpu_multi.sh dropin OUTDIR
#       The drop-in Trainer and the search under DDP on 2 GPUs (issue 28): `loop compare --trainer_runs 2 --script` on
#       docs/examples/train_text_classification.py (DROPIN_STEPS, default 60; must say PARITY), then `loop search`
#       with 2 trials, each of which must have run on both processes (both ranks' RNG files in its checkpoint).
#   bash tests/gpu/gpu_multi.sh more OUTDIR     # checks, then shard
#   Two 10-minute calls on a pair of H200s (timed there: resume ~230 s, checks ~90 s, shard ~300 s for gpt2-124m and
#   ~450 s for gpt2-xl):
#       EXTRA_JOB="--full_determinism true" SPREAD=1 bash tests/gpu/gpu_multi.sh resume OUT; MODELS=gpt2-124m bash tests/gpu/gpu_multi.sh shard OUT
#       EXTRA_JOB="--full_determinism true" bash tests/gpu/gpu_multi.sh checks OUT; MODELS=gpt2-xl bash tests/gpu/gpu_multi.sh shard OUT
set -uo pipefail
what=$1; out=$2; shift 2; mkdir -p "$out"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
NODROP='"resid_pdrop": 0, "embd_pdrop": 0, "attn_pdrop": 0'
JOB=(--config tasks/configs/gpt2_124m.yaml --disable_tqdm --bf16 false --logging_steps 1 --max_docs 300
     --dataloader_num_workers 0 --warmup_steps 2
     --model_config "{\"n_embd\": 768, \"n_layer\": 12, \"n_head\": 12, \"n_positions\": 1024, \"vocab_size\": 50257, $NODROP}"
     ${EXTRA_JOB:-})
declare -A CFG=([ddp]=multi_gpu_ddp [fsdp2]=fsdp2 [zero2]=deepspeed_zero2 [zero3]=deepspeed_zero3 [one]=single_gpu
                [sharded]=multi_gpu_ddp)
declare -A OPTS=([sharded]="--sharded_optimizer true")  # a topology that is DDP plus the loop's own fields
# every launch is stopped after RUN_TIMEOUT seconds (exit 124, a failure): a hung collective must not eat the call
LAUNCH=(timeout -k 10 "${RUN_TIMEOUT:-300}" accelerate launch)
fail=0

same() {  # same REF RUN NAME TOL: every logged loss/grad_norm (and eval_ema_loss) of RUN equals REF's within TOL
  python - "$@" <<'PY' || fail=1
import json, os, sys
ref, run, name, tol = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
A, B = json.load(open(f"{ref}/result.json")), json.load(open(f"{run}/result.json"))
a, b = [r for r in A if "loss" in r], [r for r in B if "loss" in r]
keys = ("loss", "grad_norm")
diffs = [(abs(x[k] - y[k]) / max(abs(x[k]), 1e-12), x["step"], k) for x, y in zip(a, b) for k in keys]
worst, at, key = max(diffs, default=(1.0, None, None))
first = next(((st, k) for d, st, k in diffs if d > 0), None)  # where the runs start to differ, if they do
ea, eb = [r["eval_ema_loss"] for r in A if "eval_ema_loss" in r], [r["eval_ema_loss"] for r in B if "eval_ema_loss" in r]
ema_worst = max((abs(x - y) / abs(x) for x, y in zip(ea, eb)), default=0.0)
ok = len(a) == len(b) > 0 and [x["step"] for x in a] == [y["step"] for y in b] and worst <= tol
ok = ok and len(ea) == len(eb) and ema_worst <= tol
where = "" if first is None else f" (largest at step {at} {key}; first difference at step {first[0]} {first[1]})"
print(f"{name}: {len(b)} logged steps, max rel diff (loss, grad_norm) {worst:.2e}{where}, eval_ema_loss {ema_worst:.2e} "
      f"over {len(eb)} evals (tolerance {tol:g}) -> {'OK' if ok else 'FAILED'}")
sys.exit(0 if ok else 1)
PY
}

loads() {  # loads RUN NAME NEED_EMA: the final model (and ema/) load with from_pretrained
  python - "$@" <<'PY' || fail=1
import os, sys
from transformers import AutoModelForCausalLM
run, name, need_ema = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
m = AutoModelForCausalLM.from_pretrained(run)
ema = AutoModelForCausalLM.from_pretrained(f"{run}/ema") if os.path.isdir(f"{run}/ema") else None
ok = ema is not None or not need_ema
print(f"{name}: final model loads ({sum(p.numel() for p in m.parameters()) / 1e6:.1f}M params), ema/ "
      f"{'loads' if ema is not None else 'absent'} -> {'OK' if ok else 'FAILED'}")
sys.exit(0 if ok else 1)
PY
}

resume_one() {  # resume_one TOPOLOGY PORT: one topology's kill-and-resume sequence (ports PORT..PORT+3); its verdict
  local t=$1 p=$2 fail=0 start ref ref2 kill_pid tol spread
  local -a ema acc worker launch
  ema=(--ema_decay 0.99); [ "$t" = zero3 ] && ema=()
  acc=("${LAUNCH[@]}" --config_file launch_configs/${CFG[$t]}.yaml --num_processes ${NPROC:-2})
  # batch 2 x 4 micro-batches (16 sequences a step on 2 GPUs): the 3 runs of all 4 topologies share the GPUs at once
  worker=(tests/workers/gpu_worker.py "${JOB[@]}" "${ema[@]}" ${OPTS[$t]:-} --max_steps 12 --per_device_train_batch_size 2
          --gradient_accumulation_steps 4 --per_device_eval_batch_size 4 --eval_strategy steps --eval_steps 6 --save_strategy steps --save_steps 3)
  launch=("${acc[@]}" --main_process_port $p "${worker[@]}")
  start=$(date +%s)
  # the uninterrupted reference (twice with SPREAD=1) and the run killed after step 7 share the GPUs, at once:
  # launch start-up is most of each run's time, and 124M fits several times over
  "${acc[@]}" --main_process_port $((p + 1)) "${worker[@]}" --output_dir "$out/$t-ref" > "$out/$t-ref.log" 2>&1 &
  ref=$!
  ref2=
  if [ "${SPREAD:-0}" = 1 ]; then
    "${acc[@]}" --main_process_port $((p + 2)) "${worker[@]}" --output_dir "$out/$t-ref2" > "$out/$t-ref2.log" 2>&1 &
    ref2=$!
  fi
  KILL_AFTER_STEP=7 "${acc[@]}" --main_process_port $((p + 3)) "${worker[@]}" --output_dir "$out/$t-run" \
    > "$out/$t-kill.log" 2>&1 &
  kill_pid=$!
  wait $kill_pid
  wait $ref || { echo "$t: reference run FAILED (exit $?; 124: over RUN_TIMEOUT)"; tail -25 "$out/$t-ref.log"; wait; return 1; }
  [ -z "$ref2" ] || wait $ref2 || { echo "$t: second reference run FAILED"; tail -25 "$out/$t-ref2.log"; return 1; }
  tol=1e-6
  if [ "${SPREAD:-0}" = 1 ]; then  # the uninterrupted run's own run-to-run spread on this machine
    spread=$(python - "$out/$t-ref" "$out/$t-ref2" <<'PY'
import json, sys
a, b = ([r for r in json.load(open(f"{d}/result.json")) if "loss" in r] for d in sys.argv[1:])
print(max(abs(x[k] - y[k]) / max(abs(x[k]), 1e-12) for x, y in zip(a, b) for k in ("loss", "grad_norm")))
PY
  )
    echo "$t: two uninterrupted runs differ by up to ${spread} (relative); tolerance max(1e-6, that)"
    tol=$(python -c "print(max(1e-6, float('${spread:-0}')))")
  fi
  [ -e "$out/$t-run/model.safetensors" ] && { echo "$t: a killed run left a final model"; fail=1; }
  KILL_IN_SAVE_AT_STEP=9 "${launch[@]}" --output_dir "$out/$t-run" --resume_from_checkpoint latest > "$out/$t-kill-in-save.log" 2>&1
  [ -e "$out/$t-run/checkpoint-9" ] && { echo "$t: a checkpoint killed mid-save looks complete"; fail=1; }
  "${launch[@]}" --output_dir "$out/$t-run" --resume_from_checkpoint latest > "$out/$t-resume.log" 2>&1 || { echo "$t: resume FAILED"; tail -25 "$out/$t-resume.log"; return 1; }
  same "$out/$t-ref" "$out/$t-run" "$t kill after step 7, kill while saving step 9, resume twice" "$tol"
  loads "$out/$t-run" "$t" "$([ "$t" = zero3 ] && echo 0 || echo 1)"
  echo "$t: $(( $(date +%s) - start )) s"
  return $fail
}

checks_part() {  # equivalence, two nodes and loop compare, at the same time (correctness only)
  EQ=("${JOB[@]}" --max_steps 30 --per_device_train_batch_size 4 --eval_strategy no --save_strategy no)
  CUDA_VISIBLE_DEVICES=0 "${LAUNCH[@]}" --config_file launch_configs/single_gpu.yaml tests/workers/gpu_worker.py "${EQ[@]}" \
    --gradient_accumulation_steps 2 --output_dir "$out/eq-1gpu" > "$out/eq-1gpu.log" 2>&1 &
  local one=$!
  "${LAUNCH[@]}" --config_file launch_configs/multi_gpu_ddp.yaml --num_processes 2 --main_process_port 29641 \
    tests/workers/gpu_worker.py "${EQ[@]}" --gradient_accumulation_steps 1 --output_dir "$out/eq-2gpu" > "$out/eq-2gpu.log" 2>&1 &
  local two=$!
  local nodes=()
  for r in 0 1; do
    CUDA_VISIBLE_DEVICES=$r "${LAUNCH[@]}" --config_file launch_configs/multi_node.yaml --num_processes 2 \
      --num_machines 2 --machine_rank $r --main_process_ip 127.0.0.1 --main_process_port 29561 tests/workers/gpu_worker.py \
      "${EQ[@]}" --gradient_accumulation_steps 1 --output_dir "$out/eq-2nodes" > "$out/eq-2nodes-$r.log" 2>&1 &
    nodes+=($!)
  done
  local port=29642 t
  local -A cmp
  for t in ddp fsdp2; do
    "${LAUNCH[@]}" --config_file launch_configs/${CFG[$t]}.yaml --num_processes 2 --main_process_port $port \
      -m loop compare --config tasks/configs/gpt2_124m.yaml --max_steps 30 --logging_steps 1 --eval_strategy no \
      --disable_tqdm --full_determinism true ${EXTRA_JOB:-} --output_dir "$out/compare-$t" > "$out/compare-$t.log" 2>&1 &
    cmp[$t]=$!; port=$((port + 1))
  done
  wait $one || { echo "1-GPU run FAILED"; tail -5 "$out/eq-1gpu.log"; fail=1; }
  wait $two || { echo "2-GPU run FAILED"; tail -5 "$out/eq-2gpu.log"; fail=1; }
  same "$out/eq-1gpu" "$out/eq-2gpu" "1 GPU (batch 4, accumulation 2) vs 2 GPUs (batch 4, accumulation 1)" 1e-5
  wait ${nodes[0]} && wait ${nodes[1]} || { echo "two-node run FAILED"; tail -5 "$out/eq-2nodes-0.log"; fail=1; }
  same "$out/eq-2gpu" "$out/eq-2nodes" "two 1-GPU nodes vs one node of 2 GPUs" 1e-6
  for t in ddp fsdp2; do
    wait ${cmp[$t]} || { echo "loop compare under $t: FAILED (or no parity)"; fail=1; }
    echo "== loop compare under $t (run alongside the other checks: its speed columns mean nothing)"
    grep -v '^{' "$out/compare-$t.log" | grep -E 'train_loss|per-step|grad_norm max|Trainer vs|verdict|device' | head -8
  done
}

zero_part() {  # issue 28's table: loop-fast on 1 GPU, then 2 GPUs under DDP as it is and with each gradient-exchange field
  local w=${WORKLOAD:-gpt2-124m} name opts n cfg
  for name in one ddp sharded sharded-bf16 ddp-bf16; do
    n=2; cfg=multi_gpu_ddp; opts=()
    case $name in
      one) n=1; cfg=single_gpu ;;
      sharded) opts=(--sharded_optimizer true) ;;
      sharded-bf16) opts=(--sharded_optimizer true --grad_reduce_dtype bf16) ;;
      ddp-bf16) opts=(--grad_reduce_dtype bf16) ;;
    esac
    echo "== $w, $name"
    "${LAUNCH[@]}" --config_file launch_configs/$cfg.yaml --num_processes $n -m loop bench --workload $w \
      --sides ${ZERO_SIDES:-loop-fast} --steps ${ZERO_STEPS:-40} "${opts[@]}" ${EXTRA_JOB:-} --output_dir "$out/zero-$name" \
      > "$out/zero-$name.log" 2>&1 || { echo "$name: FAILED"; tail -5 "$out/zero-$name.log"; fail=1; }
    grep -v '^{' "$out/zero-$name.log" | grep -A3 '^side'
  done
  python - "$out" <<'PY'
import json, os, sys
rows = {n: json.load(open(os.path.join(sys.argv[1], f"zero-{n}", "bench.json")))["sides"][0]
        for n in ("one", "ddp", "sharded", "sharded-bf16", "ddp-bf16") if os.path.exists(os.path.join(sys.argv[1], f"zero-{n}", "bench.json"))}
one = rows.get("one")
for n, r in rows.items():
    x = r["tokens_per_second"] / one["tokens_per_second"] if one and r["tokens_per_second"] else float("nan")
    print(f"{n:13} {r['ms_per_step']:8.1f} ms/step {r['tokens_per_second']:12,.0f} tok/s  {x:5.2f}x one GPU  "
          f"{r['peak_memory_gb'] or 0:6.2f} GB a GPU  last loss {r['last_loss']:.4f}")
PY
}

dropin_part() {  # issue 28 item 3: the drop-in Trainer and the search under DDP on 2 GPUs
  "${LAUNCH[@]}" --config_file launch_configs/multi_gpu_ddp.yaml --num_processes 2 -m loop compare --trainer_runs 2 \
    --report_dir "$out/compare-script" --script docs/examples/train_text_classification.py --output_dir "$out/tc" \
    --max_steps ${DROPIN_STEPS:-60} --logging_steps 5 --eval_strategy steps --eval_steps 30 ${EXTRA_JOB:-} \
    > "$out/compare-script.log" 2>&1 || { echo "compare --script: FAILED"; tail -5 "$out/compare-script.log"; fail=1; }
  grep -E '^(script|per-step|tolerance)' "$out/compare-script.log"
  grep -q 'verdict: PARITY' "$out/compare-script.log" || { echo "compare --script: no PARITY"; fail=1; }
  "${LAUNCH[@]}" --config_file launch_configs/multi_gpu_ddp.yaml --num_processes 2 -m loop search \
    --hp_space docs/examples/search_space.yaml --n_trials 2 --sampler_seed 0 --max_steps 20 --eval_steps 10 \
    --save_steps 10 --max_docs 60 --max_eval_samples 16 ${EXTRA_JOB:-} --output_dir "$out/search" \
    > "$out/search.log" 2>&1 || { echo "search: FAILED"; tail -5 "$out/search.log"; fail=1; }
  grep -v '^{' "$out/search.log" | tail -4
  for run in "$out"/search/run-*; do  # each trial ran on both processes: both ranks' RNG files in its checkpoint
    n=$(ls "$run"/checkpoint-20/rng_state_*.pth 2>/dev/null | wc -l)
    echo "$(basename "$run"): $n ranks' RNG files"; [ "$n" = 2 ] || fail=1
  done
}

shard_part() {  # the sharding table: one run at a time
  XL='{"n_embd": 1600, "n_layer": 48, "n_head": 25, "n_positions": 1024, "vocab_size": 50257}'
  for t in ${TOPOLOGIES:-one ddp fsdp2 zero2 zero3}; do
    n=2; [ "$t" = one ] && n=1
    for model in ${MODELS:-gpt2-124m gpt2-xl}; do
      extra=(); [ "$model" = gpt2-xl ] && extra=(--model_config "$XL" --per_device_train_batch_size 4)
      echo "== sharding: $t, $model"
      "${LAUNCH[@]}" --config_file launch_configs/${CFG[$t]}.yaml --num_processes $n -m loop bench \
        --workload gpt2-124m --sides loop --steps 20 "${extra[@]}" ${EXTRA_JOB:-} --output_dir "$out/shard-$t-$model" \
        > "$out/shard-$t-$model.log" 2>&1
      # running out of memory is a row of the table (what sharding buys); any other failure fails the script
      if ! grep -v '^{' "$out/shard-$t-$model.log" | grep -A3 '^side'; then
        if grep -q 'out of memory' "$out/shard-$t-$model.log"; then echo "$t $model: out of memory"
        else echo "$t $model: FAILED: $(grep -E 'Error|error:|refused' "$out/shard-$t-$model.log" | tail -1 | cut -c1-200)"; fail=1; fi
      fi
    done
  done
}

case $what in
resume)
  i=0; topologies=(${*:-ddp fsdp2 zero2 zero3}); pids=()
  for t in "${topologies[@]}"; do
    if [ "${PARALLEL:-1}" = 1 ]; then
      resume_one "$t" $((29600 + 10 * i)) > "$out/$t.summary" 2>&1 &
      pids+=($!)
    else
      resume_one "$t" $((29600 + 10 * i)) > "$out/$t.summary" 2>&1; pids+=($?)
    fi
    i=$((i + 1))
  done
  for i in "${!topologies[@]}"; do  # the verdicts, in order, once all are done
    if [ "${PARALLEL:-1}" = 1 ]; then wait "${pids[$i]}" || fail=1; else [ "${pids[$i]}" = 0 ] || fail=1; fi
    grep -v -e 'Loading weights' "$out/${topologies[$i]}.summary"
  done ;;
checks) checks_part ;;
zero) zero_part ;;
dropin) dropin_part ;;
shard) shard_part ;;
more) checks_part; shard_part ;;
*) echo "usage: bash tests/gpu/gpu_multi.sh resume|checks|zero|dropin|shard|more OUTDIR [topologies]"; exit 2 ;;
esac
exit $fail
