"""Flax modules: classifiers (and, from other modules, GAN, VAE, LM)."""

from dpfed.models.classifiers import (
    ACTIVATIONS,
    CLASSIFIERS,
    CNN,
    MLP,
    LogReg,
    get_classifier,
)

__all__ = ["ACTIVATIONS", "CLASSIFIERS", "CNN", "MLP", "LogReg", "get_classifier"]
