# nemo-dpo on NVIDIA's PyTorch container (CUDA, NCCL, transformer-engine and apex included).
#   docker build -t nemo-dpo .
#   docker run --gpus all --ipc=host nemo-dpo torchrun --nproc_per_node 8 examples/train_dpo.py
FROM nvcr.io/nvidia/pytorch:25.04-py3

WORKDIR /workspace/nemo-dpo
COPY setup.py README.md ./
COPY nemo_dpo ./nemo_dpo
COPY conf ./conf
COPY examples ./examples
COPY tests ./tests
# The container's torch satisfies the requirement; only megatron-core, omegaconf and sentencepiece are added.
RUN pip install --no-cache-dir -e ".[test]"

CMD ["torchrun", "--nproc_per_node", "1", "examples/train_dpo.py"]
