# nemo-dpo on NVIDIA's PyTorch container (CUDA, NCCL, transformer-engine and apex included).
#   docker build -t nemo-dpo .
#   docker run --gpus all --ipc=host nemo-dpo                      # the default task on every GPU
#   docker run --gpus all --ipc=host -v /data:/data nemo-dpo torchrun --nproc-per-node=8 \
#       examples/train_dpo.py model.data.data_prefix.train=/data/train.jsonl ...
# 25.09 (Python 3.12) is the NGC image megatron-core 0.16 and 0.17 are tested on (their LTS
# CI image); pip picks megatron-core 0.17 on Python 3.12.
FROM nvcr.io/nvidia/pytorch:25.09-py3

WORKDIR /workspace/nemo-dpo
COPY setup.py README.md pytest.ini ./
COPY nemo_dpo ./nemo_dpo
COPY conf ./conf
COPY examples ./examples
COPY tests ./tests
# Editable, because the configs are read from conf/ next to the package. The image's
# PIP_CONSTRAINT keeps its own torch, transformer-engine and apex in place.
RUN pip install --no-cache-dir -e ".[test]"

CMD ["torchrun", "--nproc-per-node=gpu", "examples/train_dpo.py"]
