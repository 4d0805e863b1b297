#!/bin/bash
# Run 11 (CPU): Run 10 (bf16 autocast, same data, vocab, held-out set, lr schedule, seed) with AdamW weight
# decay 0.1 against the overfitting Runs 9-10 show at ~6 epochs, alone on the machine (Run 10 shared it
# with other work for ~300 steps). Evaluated on mt_bench and on the 16 held-out val prompts.
# Usage: bench/quality/run11.sh RUN8_DIR RUN5_WORKDIR   (RUN8_DIR after run9.sh: ds_synth_cpu, vocab_8192_cpu)
exec "$(dirname "$0")/run_bf16.sh" 11 "${1:?usage: run11.sh RUN8_DIR RUN5_WORKDIR}" "${2:?}" --weight-decay 0.1
