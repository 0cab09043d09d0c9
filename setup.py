"""megatron-tropd: Trust Region On-Policy Distillation on megatron-core.

On a CPU host install torch first (`pip install torch==2.13.0`, a CPU wheel) so that the `torch`
requirement below is already met and pip never pulls a CUDA build; `scripts/setup_env.sh` does this.
"""

from setuptools import find_packages, setup

setup(
    name="megatron-tropd",
    version="0.1.0",
    description="Trust Region On-Policy Distillation (TrOPD) and its baselines on megatron-core",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_tropd", "megatron_tropd.*"]),
    package_data={"megatron_tropd": ["configs/*.json"]},  # model configs of the memory plan
    install_requires=[
        "megatron-core>=0.16.1",
        "torch>=2.4",
        "sentencepiece",
        "tensorboard",
        "transformers",
        "safetensors",
        "numpy",
        "tqdm",
        "psutil",
        "pyarrow",      # Parquet prompt files
        "datasets",     # prompt directories written by datasets.Dataset.save_to_disk
        "math-verify",  # the math verifier (LaTeX and numeric answer equivalence)
    ],
    entry_points={
        "console_scripts": [
            "megatron-tropd-train = megatron_tropd.train:main",
        ],
    },
    extras_require={
        "dev": ["pytest", "matplotlib"],  # matplotlib: plots of tools/run_results.py
        "gpu": ["transformer-engine[pytorch]"],
        # benchmarks/vs_trl.py only; pip keeps an installed torch that satisfies TRL
        "bench": ["trl==1.16.0", "accelerate"],
    },
)
