"""s4v: Side4Video training system (frozen image ViT + trainable spatial-temporal side network)."""
from setuptools import find_packages, setup

setup(
    name="s4v",
    version="0.1.0",
    description="Memory-efficient image-to-video transfer with Side4Video side networks",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["s4v", "s4v.*", "data_prep", "data_prep.*"]),
    include_package_data=True,
    install_requires=[
        "torch>=2.1",
        "torchvision",
        "open_clip_torch>=3.0",  # never the [training] extra: it pins webdataset<=0.2.86
        "deepspeed>=0.14",
        "pyyaml",
        "tensorboard",
        "av",  # PyAV: transcoding in data_prep and clip validation
        "tqdm",
    ],
    extras_require={
        # DALI publishes one wheel per CUDA major; cuda130 matches torch's cu130 build.
        "dali": ["nvidia-dali-cuda130; platform_system == 'Linux'"],
        "dali-cuda120": ["nvidia-dali-cuda120; platform_system == 'Linux'"],
        "test": ["pytest>=7", "pytest-timeout", "nvidia-dali-cuda130; platform_system == 'Linux'"],
    },
    entry_points={"console_scripts": ["s4v=s4v.cli.main:main"]},
)
