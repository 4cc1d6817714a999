"""nemo-dpo: DPO / IPO / RPO training of megatron-core GPT models."""

from setuptools import find_packages, setup

setup(
    name="nemo-dpo",
    version="0.1.0",
    description="Direct Preference Optimization (DPO, IPO, RPO) for tensor-, pipeline- and data-parallel GPTs on megatron-core",
    python_requires=">=3.10",
    packages=find_packages(include=["nemo_dpo", "nemo_dpo.*"]),
    package_data={"nemo_dpo": ["data/default/*.jsonl"]},
    install_requires=[
        # Any torch that megatron-core supports; on a CPU box install the CPU wheel first.
        "torch>=2.5",  # scaled_dot_product_attention(enable_gqa=...)
        # 0.16 is what pip resolves on Python 3.11; GPU containers on Python 3.12 get 0.17+.
        "megatron-core>=0.16.1,<0.18",
        "omegaconf>=2.3",
        "sentencepiece>=0.2",
        "jinja2>=3.1",  # chat templates (rendered in its sandbox, as Hugging Face does)
        # Hugging Face tokenizer folders, read by AutoTokenizer: the reference their tokens are defined by (slow-only
        # tokenizer.model folders need its sentencepiece extra, protobuf, for the conversion).
        "transformers[sentencepiece]>=4.46",
        "safetensors>=0.4",  # Hugging Face weights in and out (models/hf/safetensors_io.py)
        "numpy",
        "psutil",  # megatron-core dist_checkpointing needs it
        "tensorboard",  # the default logger (exp_manager.create_tensorboard_logger)
    ],
    extras_require={
        # Parquet and Arrow data files (JSON Lines needs nothing more).
        "data": ["pyarrow"],
        # pyarrow: the Parquet/Arrow data tests; trl, datasets: TRL 1.16's own code is the oracle of the tokenization
        # and loss tests, its DPOConfig fields are each answered, and datasets' folders are read as data;
        # pytest-timeout: a test that hangs fails with its stack instead of holding up the whole suite.
        # pytest-xdist: two workers (pytest.ini), so that one file's imports and waits overlap another's steps.
        "test": ["pytest>=8", "pytest-timeout", "pytest-xdist>=3.2", "hypothesis", "pyarrow", "matplotlib", "dockerfile-parse>=2", "trl~=1.16.0", "datasets"],
        # python -m nemo_dpo.plot <log dir>: PNGs of the metrics.
        "plot": ["matplotlib"],
        # exp_manager.create_wandb_logger=true.
        "wandb": ["wandb"],
        # Optional GPU accelerators, used when importable: transformer-engine, apex.
        "gpu": ["transformer-engine[pytorch]"],
        # bench/bench_dpo.py runs the same workload through TRL's DPOTrainer.
        "bench": ["trl>=1.16", "transformers", "datasets", "matplotlib"],
    },
)
