#!/bin/bash
# Run 10 (CPU): Run 9 again (same data, vocab, held-out set, lr schedule, seed) with the trainer's new
# CPU default --dtype auto = bf16 autocast on a CPU with native bf16 (AVX512-BF16 here), so the same
# hour holds more steps. Evaluated on mt_bench and on the 16 held-out val prompts, like Run 9.
# Usage: bench/quality/run10.sh RUN8_DIR RUN5_WORKDIR   (RUN8_DIR after run9.sh: ds_synth_cpu, vocab_8192_cpu)
exec "$(dirname "$0")/run_bf16.sh" 10 "${1:?usage: run10.sh RUN8_DIR RUN5_WORKDIR}" "${2:?}"
