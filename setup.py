from setuptools import find_packages, setup

setup(
    name="longvq",
    version="0.1.0",
    description="LongVQ: linear-time exact VQ-attention long-sequence models for Hugging Face Transformers",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    packages=find_packages(include=["longvq", "longvq.*"]),
    package_data={"longvq": ["data/*.txt"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        # 5.24 renamed generate()'s cache argument (`past_key_values` -> `cache`); tested on 5.23 only.
        "transformers>=5.23,<5.24",
        "safetensors>=0.4",
        "tqdm",
        "matplotlib",
        "huggingface_hub>=1.0",
        "tokenizers>=0.20",
        "jinja2",
        "datasets>=5.2",  # task builders and the training CLI
        "accelerate>=1.15",  # Trainer needs it
    ],
    extras_require={"test": ["pytest>=8", "hypothesis>=6", "peft>=0.21"]},
    entry_points={
        "console_scripts": [
            "longvq-demo=longvq.demo:main",
            "longvq-benchmark=longvq.benchmark:main",
            "longvq-export=longvq.hub:main",
            "longvq-card=longvq.model_card:main",
            "longvq-train-clm=longvq.training:main",
            "longvq-train=longvq.experiments:train_main",
            "longvq-eval=longvq.experiments:evaluate_main",
            "longvq-compare=longvq.experiments:compare_main",
        ],
    },
)
