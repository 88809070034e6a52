"""TopAgg, the gradient-voting mechanism of DataLens (Wang et al., CCS 2021).

For one generated sample, every teacher turns its gradient g (one value per pixel) into a
vote vector in {-1, 0, +1}^D with exactly k non-zeros:
1. keep the k coordinates of largest |g| (top-k compression);
2. clip them to [-b, b] and quantise each to a stochastic sign, +1 with probability
   1/2 + g/(2b), else -1 (unbiased for g/b: E[sign] = clip(g, -b, b) / b).
The votes are summed over teachers, N(0, sigma^2) is added to every coordinate of the
sum (`dpfed.privacy.add_gaussian_noise`), and the noisy sum is thresholded at beta * T
(+1 above, -1 below -beta * T, 0 between). Thresholding is post-processing of the noisy
sum and costs no privacy.

Sensitivity. Two vote vectors v, v' of one teacher, supports S, S' (|S| = |S'| = k):
coordinates in S n S' differ by 0 or 2, those in the symmetric difference by 1, others
by 0, so ||v - v'||^2 <= 4 |S n S'| + 2 (k - |S n S'|) = 2k + 2 |S n S'| <= 4k. The
bound sqrt(4k) is attained (same support, opposite signs); disjoint supports give only
sqrt(2k). One aggregation of one sample, when a single teacher's vote may change
arbitrarily, is therefore the Gaussian mechanism with noise multiplier sigma / sqrt(4k).
The same holds when a teacher votes once on a whole batch of samples flattened into one
vector of B*D coordinates (`vote_scope="batch"`, `TeacherEnsemble.vote_sum`): the vote
still has k non-zeros, so one such aggregation is one Gaussian event of the same multiplier.
That batch scope is our variant, not the paper's: the paper and its public code
(AI-secure/DataLens, `model.py` `train_together`: `for j in range(self.batch_size)`,
one `signsgd_aggregate` and one RDP charge per sample) aggregate each generated sample
on its own (`vote_scope="sample"`).

The bound b. Here b is one fixed number (`--grad_bound`). The public code
(`rdp_utils.stachastic_convert2topk`) scales each teacher's vote on a sample by
b_t = min(max_j |g_tj|, max_grad), its own largest gradient coordinate capped at
`--max_grad`, and its gradients are those of the batch-mean generator loss (1/B of ours,
which sums per-sample losses). Either way a vote has k entries in {-1, +1}, so the
sensitivity and the accounting are unchanged; only how often a vote follows the sign of
a small gradient differs.
"""

import dataclasses
import math
import numbers

import jax
import jax.numpy as jnp
from dp_accounting import dp_event

from dpfed.privacy import add_gaussian_noise
from dpfed.train.config import require_finite_floats


def teacher_vote(grad: jax.Array, key: jax.Array, k: int, b: float) -> jax.Array:
    """One teacher's vote on one sample: `grad` [D] -> float32 [D] in {-1, 0, +1}.

    Exactly `k` coordinates (the top-k of |grad|, ties broken by `lax.top_k`) are non-zero,
    each +1 with probability 1/2 + clip(g, -b, b) / (2b).
    """
    _, index = jax.lax.top_k(jnp.abs(grad), k)
    clipped = jnp.clip(grad[index], -b, b)
    plus = jax.random.uniform(key, (k,)) < 0.5 + clipped / (2 * b)
    return jnp.zeros(grad.shape, jnp.float32).at[index].set(jnp.where(plus, 1.0, -1.0))


@dataclasses.dataclass(frozen=True)
class TopAgg:
    """The TopAgg mechanism: its parameters, the noise it adds and the DpEvent it costs.

    Frozen and hashable (a static jit argument). The only place where the noise std
    and the recorded event are derived, so they cannot disagree.

    Attributes:
      k: non-zeros per teacher vote (top-k by magnitude).
      b: gradient clipping bound of the stochastic sign.
      sigma: std of the Gaussian noise added to each coordinate of the vote sum.
      beta: threshold as a multiple of the number of teachers T (beta > 1 is allowed:
        when sigma is much larger than T, only the noisy sum can cross beta * T).
    """

    k: int
    b: float
    sigma: float
    beta: float

    def __post_init__(self):
        require_finite_floats(self)
        # A whole number: a vote has k non-zeros, and the sensitivity sqrt(4k) assumes it
        # (k = 2.5 or NaN passed `k < 1` before and gave a wrong or NaN event).
        if isinstance(self.k, bool) or not isinstance(self.k, numbers.Integral) or self.k < 1:
            raise ValueError(f"k must be a whole number >= 1, got {self.k!r}")
        if not self.b > 0:
            raise ValueError(f"b must be > 0, got {self.b}")
        if not self.sigma >= 0:
            raise ValueError(f"sigma must be >= 0, got {self.sigma}")
        if not self.beta >= 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")

    @property
    def sensitivity(self) -> float:
        """L2 distance bound between two votes of one teacher: sqrt(4k)."""
        return math.sqrt(4 * self.k)

    @property
    def noise_multiplier(self) -> float:
        """sigma / sqrt(4k): the Gaussian noise multiplier of one aggregation."""
        return self.sigma / self.sensitivity

    def dp_event(self) -> dp_event.DpEvent:
        """The release of ONE noisy vote sum (one sample's, or one batch's with batch scope;
        one teacher's k-sparse vote may change)."""
        return dp_event.GaussianDpEvent(self.noise_multiplier)

    def vote(self, grad: jax.Array, key: jax.Array) -> jax.Array:
        """`teacher_vote` with this mechanism's k and b."""
        return teacher_vote(grad, key, self.k, self.b)

    def privatize(self, vote_sum: jax.Array, key: jax.Array) -> jax.Array:
        """The vote sum plus N(0, sigma^2) on every coordinate: the DP release."""
        return add_gaussian_noise(vote_sum, key, self.sigma)

    def threshold(self, noisy_sum: jax.Array, num_teachers: int) -> jax.Array:
        """+1 / -1 / 0 by comparison with +-beta * T. Post-processing: no privacy cost."""
        limit = self.beta * num_teachers
        return jnp.where(noisy_sum > limit, 1.0, jnp.where(noisy_sum < -limit, -1.0, 0.0))

    def aggregate(self, votes: jax.Array, key: jax.Array) -> jax.Array:
        """Votes [T, ..., D] of T teachers -> the thresholded aggregate [..., D]."""
        return self.threshold(self.privatize(jnp.sum(votes, axis=0), key), votes.shape[0])
