"""Generative methods (one module each) and the generator contract they all keep."""

from dpfed.generative.contract import (
    SYNTHETIC_FILE,
    Generator,
    SyntheticSet,
    load_generator,
    load_synthetic,
    register_generator,
    sample_synthetic,
    save_synthetic,
)

__all__ = [
    "SYNTHETIC_FILE",
    "Generator",
    "SyntheticSet",
    "load_generator",
    "load_synthetic",
    "register_generator",
    "sample_synthetic",
    "save_synthetic",
]
