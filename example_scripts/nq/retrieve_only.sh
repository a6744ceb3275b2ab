#!/bin/bash
#SBATCH --cpus-per-task=10
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=8
#SBATCH --gres=gpu:8
#SBATCH --time=4:00:00
#SBATCH --job-name=nq
#SBATCH --output=run_dir/%A.out
#SBATCH --error=run_dir/%A.err
#SBATCH --signal=USR1@140
#SBATCH --open-mode=append
#SBATCH --mem=470GB
# Site-specific in the original (FAIR cluster); enable with your cluster's values:
##SBATCH --partition=devlab
##SBATCH --constraint=volta32gb

# Atlas' stand-alone retriever mode: embed a corpus (Wikipedia 2018, ~30M passages), save the index, retrieve for
# the NQ dev and test questions and write the retrieved passages (no reader is loaded).
# Prepare once (DATA_DIR defaults to ./atlas_data):
#   python preprocessing/prepare_qa.py --output_directory ${DATA_DIR}/data
#   python preprocessing/download_corpus.py --corpus corpora/wiki/enwiki-dec2018 --output_directory ${DATA_DIR}
#   python preprocessing/download_model.py --model models/atlas_nq/xl --output_directory ${DATA_DIR}
# Run:  bash example_scripts/nq/retrieve_only.sh                     (torchrun, NGPU=8 processes here)
#       mkdir -p run_dir && sbatch example_scripts/nq/retrieve_only.sh
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
[[ -f "$ROOT/train.py" ]] || ROOT=${SLURM_SUBMIT_DIR:-$PWD}  # sbatch runs a copy of the script from a spool dir
source "$ROOT/example_scripts/launcher.sh"  # LAUNCH (srun or torchrun), JOB_ID, port; cd to the repository root

size=${SIZE:-xl}
DATA_DIR=${DATA_DIR:-./atlas_data}

# we'll retrieve from the following passages:
PASSAGES_TO_RETRIEVE_FROM="${DATA_DIR}/corpora/wiki/enwiki-dec2018/text-list-100-sec.jsonl ${DATA_DIR}/corpora/wiki/enwiki-dec2018/infobox.jsonl"

# run retrieval for the Natural Questions dev and test data
EVAL_FILES="${DATA_DIR}/data/nq_data/dev.jsonl ${DATA_DIR}/data/nq_data/test.jsonl"

# we'll retrieve using the Atlas pretrained retriever, subsequently finetuned on Natural Questions
# (or run with PRETRAINED_MODEL=none to retrieve with the standard Contriever weights instead)
PRETRAINED_MODEL=${PRETRAINED_MODEL:-${DATA_DIR}/models/atlas_nq/${size}}

SAVE_DIR=${DATA_DIR}/experiments/
EXPERIMENT_NAME=${JOB_ID}-${size}-nq-retrieve-only

"${LAUNCH[@]}" evaluate.py \
    --name ${EXPERIMENT_NAME} \
    --reader_model_type google/t5-${size}-lm-adapt \
    --text_maxlength 512 \
    --model_path ${PRETRAINED_MODEL} \
    --eval_data ${EVAL_FILES} \
    --n_context 40 --retriever_n_context 40 \
    --checkpoint_dir ${SAVE_DIR} \
    --main_port $port \
    --index_mode "flat" \
    --task "qa" \
    --save_index_path ${SAVE_DIR}/${EXPERIMENT_NAME}/saved_index \
    --write_results \
    --retrieve_only \
    --passages ${PASSAGES_TO_RETRIEVE_FROM}

# observe the logs at ${SAVE_DIR}/${EXPERIMENT_NAME}/run.log.
# Retrieval results are saved in ${SAVE_DIR}/${EXPERIMENT_NAME}, and the index in ${SAVE_DIR}/${EXPERIMENT_NAME}/saved_index
