#!/bin/bash
#SBATCH --cpus-per-task=10
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=8
#SBATCH --gres=gpu:8
#SBATCH --time=8:00:00
#SBATCH --job-name=templama
#SBATCH --output=run_dir/%A.out
#SBATCH --error=run_dir/%A.err
#SBATCH --signal=USR1@140
#SBATCH --open-mode=append
# Site-specific in the original (FAIR cluster); enable with your cluster's values:
##SBATCH --partition=learnlab
##SBATCH --constraint=volta32gb

# TempLAMA evaluation of a model finetuned by example_scripts/templama/train.sh, retrieving from the Wikipedia dump
# of Dec YEAR: e.g. train on 2017 and evaluate with the 2020 index and questions to test temporal transfer.
# Run:  bash example_scripts/templama/evaluate.sh YEAR MODEL_TO_EVAL     (torchrun, NGPU=8 processes here)
#       mkdir -p run_dir && sbatch example_scripts/templama/evaluate.sh YEAR MODEL_TO_EVAL
# where MODEL_TO_EVAL is a checkpoint directory, e.g. ${DATA_DIR}/experiments/<name>/checkpoint/latest
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
[[ -f "$ROOT/train.py" ]] || ROOT=${SLURM_SUBMIT_DIR:-$PWD}  # sbatch runs a copy of the script from a spool dir
source "$ROOT/example_scripts/launcher.sh"  # LAUNCH (srun or torchrun), JOB_ID, port; cd to the repository root

size=${SIZE:-xl}
DATA_DIR=${DATA_DIR:-./atlas_data}
YEAR=${1:-"2017"}
MODEL_TO_EVAL=${2:-${MODEL_TO_EVAL:-}}  # Model finetuned by example_scripts/templama/train.sh
if [[ -z "${MODEL_TO_EVAL}" ]]; then
    echo "usage: $0 YEAR MODEL_TO_EVAL (a checkpoint directory written by example_scripts/templama/train.sh)" >&2
    exit 2
fi

EVAL_FILES="${DATA_DIR}/data/templama_data/temp_lama.valid.${YEAR}.jsonl ${DATA_DIR}/data/templama_data/temp_lama.test.${YEAR}.jsonl"
PASSAGES="${DATA_DIR}/corpora/wiki/enwiki-dec${YEAR}/text-list-100-sec.jsonl ${DATA_DIR}/corpora/wiki/enwiki-dec${YEAR}/infobox.jsonl"
SAVE_DIR=${DATA_DIR}/experiments/
EXPERIMENT_NAME=${JOB_ID}-${size}-templama-${YEAR}
PRECISION="fp32" # "bf16"

"${LAUNCH[@]}" evaluate.py \
    --name ${EXPERIMENT_NAME} \
    --generation_max_length 32 --target_maxlength 32 \
    --gold_score_mode "ppmean" \
    --precision ${PRECISION} \
    --reader_model_type google/t5-${size}-lm-adapt \
    --text_maxlength 384 \
    --model_path ${MODEL_TO_EVAL} \
    --eval_data ${EVAL_FILES} \
    --per_gpu_batch_size 1 \
    --n_context 20 --retriever_n_context 20 \
    --checkpoint_dir ${SAVE_DIR} \
    --main_port $port \
    --index_mode "flat" \
    --task "qa" \
    --passages ${PASSAGES} \
    --write_results \
    --qa_prompt_format "{question}"
