"""Privacy core: clipping, noise, sampling, accounting, and the privacy ledger."""

from dpfed.privacy.accounting import (
    CalibrationError,
    Sampling,
    calibrate_noise_multiplier,
    dpsgd_event,
    epsilon,
    format_upper,
    is_whole_number,
    rdp_epsilon,
    relation_for,
    sampled_gaussian_event,
    warn_if_delta_too_large,
)
from dpfed.privacy.clipping import ClippedSum, clip_to_norm, clipped_grad_sum, global_l2_norm
from dpfed.privacy.ledger import BudgetExceededError, PrivacyLedger, event_from_json, event_to_json
from dpfed.privacy.mechanisms import GaussianSumMechanism
from dpfed.privacy.noise import add_gaussian_noise, divide_as, standard_normal
from dpfed.privacy.sampling import (
    bernoulli_at_most,
    bernoulli_threshold,
    chunked_sum,
    fixed_size_sample,
    poisson_chunk_size,
    poisson_sample,
)

__all__ = [
    "BudgetExceededError",
    "CalibrationError",
    "ClippedSum",
    "GaussianSumMechanism",
    "PrivacyLedger",
    "Sampling",
    "add_gaussian_noise",
    "bernoulli_at_most",
    "bernoulli_threshold",
    "calibrate_noise_multiplier",
    "chunked_sum",
    "clip_to_norm",
    "clipped_grad_sum",
    "divide_as",
    "dpsgd_event",
    "epsilon",
    "event_from_json",
    "event_to_json",
    "fixed_size_sample",
    "format_upper",
    "global_l2_norm",
    "is_whole_number",
    "poisson_chunk_size",
    "poisson_sample",
    "rdp_epsilon",
    "relation_for",
    "sampled_gaussian_event",
    "standard_normal",
    "warn_if_delta_too_large",
]
