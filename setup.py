from setuptools import setup

setup(
    name="sar2opt-diffusion",
    version="0.1.0",
    description="Conditional diffusion for SAR-to-optical image translation (Bai, Pu, Xu, GRSL 2023)",
    packages=[
        "guided_diffusion",
        "guided_diffusion.base",
        "guided_diffusion.demo",
        "guided_diffusion.evaluation",
        "guided_diffusion.io",
        "guided_diffusion.page",
        "guided_diffusion.translation",
    ],
    python_requires=">=3.10",
    # torch is not pinned here on purpose: install the build for your machine first
    # (README), otherwise pip pulls a multi-gigabyte CUDA build. 2.4 is the oldest
    # release with every API the code calls (AdamW's fused kernel on the CPU arrived
    # in 2.4; init_process_group's device_id in 2.2); 2.13 is the version tested.
    install_requires=[
        "torch>=2.4",
        "numpy",
        "pillow",
        "tqdm",
        "scikit-image",  # SSIM and PSNR
        "scipy",  # the matrix square root of the Frechet distance (FID)
        "mpi4py",
        "rasterio",  # GeoTIFF and 16-bit rasters (its wheels include GDAL)
    ],
    extras_require={
        # an MPI library for mpiexec when the machine has none (clusters usually do)
        "mpi": ["mpich"],
        # rio-cogeo: its validator checks that scene outputs are Cloud-Optimized
        "test": ["pytest", "mpich", "ruff", "rio-cogeo"],
        # the web page (scripts/app.py) and its tests: gradio_client drives it over
        # HTTP, playwright drives a real Chromium (the system's: apt-get install chromium)
        "app": ["gradio", "gradio_client", "playwright"],
        # the documentation site (mkdocs build --strict; 1.6 for generated pages)
        "docs": ["mkdocs>=1.6", "mkdocs-material>=9.5"],
    },
)
