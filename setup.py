"""rfpo_megatron: RFPO (fix-stage RL post-training) on Megatron-core + SGLang."""
import platform

from setuptools import find_packages, setup

install_requires = [
    # torch is not pinned: GPU images (NGC) provide their own build; dev/CI install torch==2.13.0 (CPU) first.
    "torch>=2.4",
    "megatron-core>=0.12",
    "numpy",
    "wandb",
    "safetensors",
    "transformers>=4.45",
    "tokenizers",
    "math-verify",
    "omegaconf>=2.3",
    "pyyaml",
    "aiohttp",
    "requests",
    "tqdm",
    "psutil",  # megatron dist_checkpointing's async writer needs it
]
if platform.system() == "Linux" and platform.machine() in ("x86_64", "AMD64"):
    # Triton runs the kernels on CPU through its interpreter (TRITON_INTERPRET=1) in tests.
    install_requires.append("triton")

setup(
    name="rfpo_megatron",
    version="0.1.0",
    description="RFPO: RL post-training with a fix stage, on Megatron-core and SGLang",
    packages=find_packages(include=["rfpo_megatron", "rfpo_megatron.*"]),
    package_data={"rfpo_megatron.rewards": ["code_tasks.jsonl"]},
    python_requires=">=3.10",
    install_requires=install_requires,
    extras_require={
        # apex is deliberately absent: the PyPI package named `apex` is an unrelated web toolkit.
        "gpu": ["sglang[all]>=0.5.4", "sglang-router>=0.3", "transformer-engine[pytorch]"],
        # sglang-router: the real router in the rollout tests; msgspec..orjson: what SGLang's own request schema,
        # serializer and CLI parser need when the tests load them from the pinned wheel (tools/fetch_sglang_ref.py)
        # TRL's GRPOTrainer beside the step benchmark (tools/bench_step.py --trl); `make bench-trl` puts it in .venv-trl
        "trl": ["trl==1.16.0"],
        "dev": ["pytest>=7", "pytest-timeout", "matplotlib", "pyarrow", "sglang-router==0.3.2", "msgspec", "pybase64",
                "pyzmq", "pillow", "orjson"],
    },
    entry_points={"console_scripts": ["rfpo-megatron=rfpo_megatron.cli:main"]},
)
