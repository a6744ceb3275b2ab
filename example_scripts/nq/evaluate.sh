#!/bin/bash
#SBATCH --cpus-per-task=10
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=8
#SBATCH --gres=gpu:8
#SBATCH --time=1:00:00
#SBATCH --job-name=nq
#SBATCH --output=run_dir/%A.out
#SBATCH --error=run_dir/%A.err
#SBATCH --signal=USR1@140
#SBATCH --open-mode=append
#SBATCH --mem=470GB
# Site-specific in the original (FAIR cluster); enable with your cluster's values:
##SBATCH --partition=learnlab
##SBATCH --constraint=volta32gb

# Evaluate the released NQ-finetuned Atlas-xl (FINETUNED=TRUE, default) or pretrained Atlas-xl (FINETUNED=FALSE) on
# NQ dev and test with its pre-built wiki-dec2018 index.
# Prepare once (DATA_DIR defaults to ./atlas_data):
#   python preprocessing/prepare_qa.py --output_directory ${DATA_DIR}/data
#   python preprocessing/download_model.py --model models/atlas_nq/xl --output_directory ${DATA_DIR}
#   python preprocessing/download_index.py --index indices/atlas_nq/wiki/xl --output_directory ${DATA_DIR} --convert
# Run:  bash example_scripts/nq/evaluate.sh                          (torchrun, NGPU=8 processes here)
#       mkdir -p run_dir && sbatch example_scripts/nq/evaluate.sh
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
[[ -f "$ROOT/train.py" ]] || ROOT=${SLURM_SUBMIT_DIR:-$PWD}  # sbatch runs a copy of the script from a spool dir
source "$ROOT/example_scripts/launcher.sh"  # LAUNCH (srun or torchrun), JOB_ID, port; cd to the repository root

size=${SIZE:-xl}
DATA_DIR=${DATA_DIR:-./atlas_data}

EVAL_FILES="${DATA_DIR}/data/nq_data/dev.jsonl ${DATA_DIR}/data/nq_data/test.jsonl"
FINETUNED=${FINETUNED:-"TRUE"}
if [[ "${FINETUNED}" == "TRUE" ]]; then
    PRETRAINED_MODEL=${DATA_DIR}/models/atlas_nq/${size}
    PRETRAINED_INDEX=${DATA_DIR}/indices/atlas_nq/wiki/${size}-converted  # made by download_index.py --convert
else
    PRETRAINED_MODEL=${DATA_DIR}/models/atlas/${size}
    PRETRAINED_INDEX=${DATA_DIR}/indices/atlas/wiki/${size}-converted
fi
SAVE_DIR=${DATA_DIR}/experiments/
EXPERIMENT_NAME=${JOB_ID}-${size}-nq-eval
PRECISION="fp32" # "bf16"

# The original passed --target_maxlength twice (32, then 16); argparse kept the last, so 16 it is.
"${LAUNCH[@]}" evaluate.py \
    --name ${EXPERIMENT_NAME} \
    --generation_max_length 32 \
    --gold_score_mode "ppmean" \
    --precision ${PRECISION} \
    --reader_model_type google/t5-${size}-lm-adapt \
    --text_maxlength 512 \
    --target_maxlength 16 \
    --model_path ${PRETRAINED_MODEL} \
    --load_index_path ${PRETRAINED_INDEX} \
    --eval_data ${EVAL_FILES} \
    --per_gpu_batch_size 1 \
    --n_context 40 --retriever_n_context 40 \
    --checkpoint_dir ${SAVE_DIR} \
    --main_port $port \
    --index_mode "flat" \
    --task "qa" \
    --write_results
