#!/usr/bin/env bash
# 2-GPU runs for issue 10: for DDP, FSDP2, ZeRO-2 and ZeRO-3, train GPT-2 124M (fp32, dropout off), SIGKILL the whole
# launch after step 7, resume 'latest', and compare every logged loss and grad norm with the uninterrupted run
# (1e-6 relative), eval_ema_loss included (the EMA rides along except under ZeRO-3, where it is refused). Then check
# that the final model and its ema/ load with from_pretrained. Exits non-zero on any failure.
#   bash tests/gpu_multi.sh OUTDIR [topologies...]      (run from the repo root; DeepSpeed needs its wheel)
#   NPROC=1 bash tests/gpu_multi.sh OUTDIR zero2 zero3  (one GPU: the same checks through one process)
set -uo pipefail
out=$1; shift; mkdir -p "$out"
tops=${*:-ddp fsdp2 zero2 zero3}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
JOB=(--config tasks/configs/gpt2_124m.yaml --disable_tqdm --bf16 false --max_steps 12 --logging_steps 1
     --per_device_train_batch_size 4 --gradient_accumulation_steps 2 --eval_strategy steps --eval_steps 6
     --save_strategy steps --save_steps 3 --warmup_steps 2 --max_docs 300 --dataloader_num_workers 0
     --model_config '{"n_embd": 768, "n_layer": 12, "n_head": 12, "n_positions": 1024, "resid_pdrop": 0, "embd_pdrop": 0, "attn_pdrop": 0}')
declare -A CFG=([ddp]=multi_gpu_ddp [fsdp2]=fsdp2 [zero2]=deepspeed_zero2 [zero3]=deepspeed_zero3)
fail=0
for t in $tops; do
  # the EMA rides along (per shard under FSDP2) except under ZeRO-3, where it is refused with one line
  ema=(--ema_decay 0.99); [ "$t" = zero3 ] && ema=()
  launch=(accelerate launch --config_file launch_configs/${CFG[$t]}.yaml --num_processes ${NPROC:-2} tests/gpu_worker.py "${ema[@]}")
  start=$(date +%s)
  "${launch[@]}" "${JOB[@]}" --output_dir "$out/$t-ref" > "$out/$t-ref.log" 2>&1 || { echo "$t: reference run FAILED"; tail -25 "$out/$t-ref.log"; fail=1; continue; }
  KILL_AFTER_STEP=7 "${launch[@]}" "${JOB[@]}" --output_dir "$out/$t-run" > "$out/$t-kill.log" 2>&1
  [ -e "$out/$t-run/model.safetensors" ] && { echo "$t: a killed run left a final model"; fail=1; }
  "${launch[@]}" "${JOB[@]}" --output_dir "$out/$t-run" --resume_from_checkpoint latest > "$out/$t-resume.log" 2>&1 || { echo "$t: resume FAILED"; tail -25 "$out/$t-resume.log"; fail=1; continue; }
  python - "$out/$t-ref" "$out/$t-run" "$t" "$(( $(date +%s) - start ))" <<'PY' || fail=1
import json, sys
ref, run, name, secs = sys.argv[1:]
a = [r for r in json.load(open(f"{ref}/result.json")) if "loss" in r]
b = [r for r in json.load(open(f"{run}/result.json")) if "loss" in r]
worst = max(abs(x[k] - y[k]) / max(abs(x[k]), 1e-12) for x, y in zip(a, b) for k in ("loss", "grad_norm"))
ea = [r["eval_ema_loss"] for r in json.load(open(f"{ref}/result.json")) if "eval_ema_loss" in r]
eb = [r["eval_ema_loss"] for r in json.load(open(f"{run}/result.json")) if "eval_ema_loss" in r]
ema_worst = max((abs(x - y) / abs(x) for x, y in zip(ea, eb)), default=0.0)
ok = len(a) == len(b) == 12 and [x["step"] for x in a] == [y["step"] for y in b] and worst <= 1e-6
ok = ok and len(ea) == len(eb) and ema_worst <= 1e-6 and (name == "zero3" or len(ea) == 2)
from transformers import AutoModelForCausalLM
import os
m = AutoModelForCausalLM.from_pretrained(run)
ema = AutoModelForCausalLM.from_pretrained(f"{run}/ema") if os.path.isdir(f"{run}/ema") else None
ok = ok and (ema is not None or name == "zero3")
print(f"{name}: {len(b)} steps after kill at 7 + resume, max rel diff (loss, grad_norm) vs uninterrupted {worst:.2e}, "
      f"eval_ema_loss {ema_worst:.2e} over {len(eb)} evals; final model loads "
      f"({sum(p.numel() for p in m.parameters())/1e6:.1f}M params), ema/ {'loads' if ema is not None else 'absent'}; "
      f"{secs}s -> {'OK' if ok else 'FAILED'}")
sys.exit(0 if ok else 1)
PY
done
exit $fail
