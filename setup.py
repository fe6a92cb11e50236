from setuptools import setup

setup(
    name="sar2opt-diffusion",
    version="0.1.0",
    description="Conditional diffusion for SAR-to-optical image translation (Bai, Pu, Xu, GRSL 2023)",
    packages=["guided_diffusion"],
    python_requires=">=3.10",
    # torch is not pinned here on purpose: install the build for your machine first
    # (README), otherwise pip pulls a multi-gigabyte CUDA build.
    install_requires=[
        "torch>=2.0",
        "numpy",
        "pillow",
        "blobfile",
        "tqdm",
        "scikit-image",
        "mpi4py",
    ],
    extras_require={
        # an MPI library for mpiexec when the machine has none (clusters usually do)
        "mpi": ["mpich"],
        "test": ["pytest", "mpich", "ruff"],
    },
)
