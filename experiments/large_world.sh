#!/usr/bin/env bash
# Issue 20's first probe: the paper's unseen protocol on a world of 558 concepts in families.
#
#   bash experiments/large_world.sh WORK SEED [REFERENCE_IMAGES] [EVALUATION_IMAGES]
#
# Generates the world (--pool wordnet --all-concepts, 70/30 split), trains an explainer on
# EfficientNet-Lite0 blocks.5.0.bn1 (ImageNet weights, nothing else to train), and evaluates
# it with the entity protocol; `lavise evaluate` prints the table and writes
# WORK/seed-SEED/runs/eff/evaluation.json (its methods' unseen_protocol holds the bands).
# docs/unseen.md quotes development seed 0 with 1500 and 600 images.
set -euo pipefail
work=${1:?work folder}; seed=${2:?seed}; reference=${3:-1500}; evaluation=${4:-600}
out="$work/seed-$seed"
for part in reference evaluation; do
    count=$([ "$part" = reference ] && echo "$reference" || echo "$evaluation")
    lavise synth --out "$out/$part" --part "$part" --pool wordnet --all-concepts --vocabulary-size 0 \
        --unseen-fraction 0.3 --seed "$seed" --num-images "$count"
done
lavise train --model efficientnet_lite0 --weights IMAGENET --layer blocks.5.0.bn1 --seed "$seed" \
    --reference "$out/reference/annotations.json" --out "$out/runs/eff" --cache-dir "$out/cache" --no-progress
lavise evaluate "$out/runs/eff" --dataset "$out/evaluation/annotations.json" --methods activation netdissect \
    --cache-dir "$out/cache" --no-progress
