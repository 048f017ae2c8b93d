#!/usr/bin/env bash
# Regenerates the model zoo table in README.md's "Model zoo" section:
#   bash docs/make_model_zoo.sh > /tmp/zoo.md
# Every row comes from `python -m ddnn_jax.summary` (XLA cost analysis, batch 1).
set -euo pipefail
summary() { python -m ddnn_jax.summary "$@" | tail -n +3; }
echo '| model | depth | same as | params | GFLOPs | params / full | FLOPs / full |'
echo '|---|---|---|---:|---:|---:|---:|'
summary --model resnet18 --depths 1,1,1,1 2,2,2,2
summary --model resnet34 --depths 1,1,1,1 2,2,2,2 3,4,6,3
summary --model resnet50 --depths 1,1,1,1 2,2,2,2 3,4,6,3
summary --model resnet101 --depths 3,4,6,3 3,4,23,3
summary --model resnet152 --depths 3,4,6,3 3,4,23,3 3,8,36,3
summary --model cifar_resnet20 --num-classes 10 --depths 1,1,1 2,2,2 3,3,3
summary --model cifar_resnet32 --num-classes 10 --depths 1,1,1 3,3,3 5,5,5
summary --model cifar_resnet44 --num-classes 10 --depths 3,3,3 5,5,5 7,7,7
summary --model cifar_resnet56 --num-classes 10 --depths 3,3,3 5,5,5 7,7,7 9,9,9
summary --model cifar_resnet110 --num-classes 10 --depths 3,3,3 9,9,9 18,18,18
summary --model cifar_resnet18 --num-classes 100 --depths 1,1,1,1 2,2,2,2
summary --model cifar_resnet34 --num-classes 100 --depths 2,2,2,2 3,4,6,3
