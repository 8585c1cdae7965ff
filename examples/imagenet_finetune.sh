#!/usr/bin/env bash
# ImageNet recipes: a pretrained convnet made alias-free, then its accuracy recovered by distillation from
# the original, on one node of 8 GPUs (torchrun, DDP over NCCL). NOT RUN YET: no GPU has been lent to this
# work, so neither time, memory nor accuracy below is measured; record them here when you run it.
#
#   bash examples/imagenet_finetune.sh convnext_tiny convnext_tiny.pth /data/imagenet runs/cnx
#   bash examples/imagenet_finetune.sh resnet50 resnet50.pth /data/imagenet runs/r50
#
# IMAGENET holds train/ and val/ as ImageFolders of WordNet-id folders (n01440764/...).
# Acceptance targets (afconvert eval on the 50k val images, default grids, every shift certified):
#   convnext_tiny: cert-frac >= 81.04 top-1 (the paper's AFC ConvNeXt-T, trained 300 epochs from scratch)
#                  in <= 30 epochs of fine-tuning;
#   resnet50:      cert-frac within 2 points of the original's top-1 in <= 30 epochs.
set -euo pipefail
MODEL=${1:?model name (convnext_tiny or resnet50)}
WEIGHTS=${2:?weights file of the original model (timm keys)}
IMAGENET=${3:?ImageNet folder with train/ and val/}
OUT=${4:?output folder}
GPUS=${GPUS:-8}
mkdir -p "$OUT"

# 1. convert (CPU is fine), activations fitted on 64 training images
CALIB="$OUT/calibration"
if [ ! -d "$CALIB" ]; then
    mkdir -p "$CALIB/x"
    find "$IMAGENET/train" -name '*.JPEG' | awk 'NR % 20000 == 1' | head -64 | xargs -I{} cp {} "$CALIB/x/"
fi
[ -f "$OUT/converted.pt" ] || afconvert "$MODEL" --weights "$WEIGHTS" --calibration "$CALIB" --input-size 224 224 \
    --out "$OUT/converted.pt"

# 2. block-wise reconstruction, then distillation (bf16 autocast; FFT and polynomial layers stay float32)
case "$MODEL" in
    convnext*) HP=(--opt adamw --lr 4e-4 --weight-decay 0.05 --mixup 0.8 --cutmix 1.0) ;;
    *)         HP=(--opt adamw --lr 2e-4 --weight-decay 0.01 --mixup 0.2 --cutmix 1.0 --train-bn) ;;
esac
RESUME=()
[ -f "$OUT/run/last.pt" ] && RESUME=(--resume)   # a killed run continues where its last checkpoint left it
torchrun --nproc_per_node="$GPUS" -m afconvert finetune "$OUT/converted.pt" --data "$IMAGENET/train" \
    --output "$OUT/run" --epochs 30 --batch-size 128 --sched cosine --warmup-epochs 1 "${HP[@]}" \
    --model-ema --amp --amp-dtype bfloat16 --reconstruct --reconstruct-steps 200 --reconstruct-batches 8 \
    --checkpoint-every 1000 --workers 10 --device cuda "${RESUME[@]}"

# 3. the original and the fine-tuned model side by side: accuracy and certified shift accuracy
afconvert eval "$MODEL" "$OUT/run/final.pt" --weights "$WEIGHTS" --data "$IMAGENET/val" --device cuda \
    --batch-size 64 --json --out "$OUT/eval.json"
