#!/usr/bin/env bash
# What the CPU suite cannot run, on a machine with a CUDA GPU: FlexAttention's backward (packed-with-BlockMask vs
# per-pair gradients; torch 2.13 raises NotImplementedError for it on CPU), the scored-only log-prob and bf16 tests
# on the GPU build, then throughput vs TRL's DPOTrainer in bf16-mixed at Qwen2.5's vocabulary size, per-pair and
# packed with FlexAttention. Each benchmark's last line is `ratio: <ours / TRL>`.
#   bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU'; print(torch.cuda.get_device_name())"
python -m pytest -q -p no:cacheprovider tests/test_packing.py tests/test_logprobs.py -k "flex or bf16 or scored"
python benchmarks/trl_vs_hpl.py --accelerator gpu --vocab qwen2.5 --tokenizer smollm2 --reps 3 --steps 20
python benchmarks/trl_vs_hpl.py --accelerator gpu --vocab qwen2.5 --tokenizer smollm2 --reps 3 --steps 20 \
    --packing --attn flex_attention
