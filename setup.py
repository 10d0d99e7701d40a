from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent


def transformers_requirement() -> str:
    """`transformers>=<oldest>[,!=<excluded>...],<<next major>` from ci/transformers-versions.txt, the versions CI tests
    (oldest first) and the releases it excludes (`!= X` lines)."""
    lines = (HERE / "ci" / "transformers-versions.txt").read_text(encoding="utf-8").splitlines()
    entries = [entry for entry in (line.split("#")[0].strip() for line in lines) if entry]
    oldest = next(entry for entry in entries if not entry.startswith("!="))
    excluded = [f"!={entry[2:].strip()}" for entry in entries if entry.startswith("!=")]
    return "transformers" + ",".join([f">={oldest}", *excluded, f"<{int(oldest.split('.')[0]) + 1}"])


setup(
    name="longvq",
    version="0.1.0",
    description="LongVQ: linear-time exact VQ-attention long-sequence models for Hugging Face Transformers",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    packages=find_packages(include=["longvq", "longvq.*"]),
    # Non-Python files and the `evaluate` metric modules (folders without __init__.py) ship inside the package.
    package_data={"longvq": ["data/*.txt", "model_cards/*.md", "metrics/*/*.py"]},
    python_requires=">=3.10",
    # Every dependency stops below its next major version; ci/matrix.py tests the transformers range.
    install_requires=[
        "torch>=2.4,<3",
        transformers_requirement(),
        "huggingface_hub>=1.0,<3",
        "tokenizers>=0.22,<1",
        "safetensors>=0.4.3,<1",
        "datasets>=5.2,<6",  # task builders and the training CLI
        "accelerate>=1.15,<2",  # Trainer needs it
        "evaluate>=0.4.6,<0.5",  # the metric modules
        "numpy>=1.26,<3",
        "pyarrow>=21,<27",  # task datasets are written as Arrow tables
        "pillow>=10,<14",  # Pathfinder images
        "matplotlib>=3.7,<4",
        "jinja2>=3.1,<4",  # model-card template
        "tqdm>=4.66,<5",
    ],
    extras_require={
        "test": ["pytest>=8,<10", "hypothesis>=6,<7", "peft>=0.21,<1", "lm-eval>=0.4.13,<0.5"],
        # The fused VQ-attention kernel (CUDA); CI runs its tests on CPU under the Triton interpreter. Linux wheels only.
        "triton": ["triton>=3.9,<4; platform_system == 'Linux'"],
    },
    entry_points={
        "console_scripts": [
            "longvq-demo=longvq.cli:demo",
            "longvq-benchmark=longvq.cli:benchmark",
            "longvq-export=longvq.cli:export",
            "longvq-verify=longvq.cli:verify",
            "longvq-card=longvq.cli:card",
            "longvq-train-clm=longvq.cli:train_clm",
            "longvq-train=longvq.cli:train",
            "longvq-eval=longvq.cli:evaluate",
            "longvq-compare=longvq.cli:compare",
        ],
    },
)
