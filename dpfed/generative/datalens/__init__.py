"""DataLens (Wang, Wu, Long, Rimanic, Zhang, Li, "DataLens: Scalable Privacy Preserving
Training via Gradient Compression and Aggregation", ACM CCS 2021) in JAX.

PATE meets GANs: the private data is split into T disjoint partitions, each trains a
*teacher* discriminator; a *student* generator never touches data. For each generated
sample every teacher computes the gradient of the generator loss w.r.t. the sample, and
the teachers vote on it with TopAgg (`topagg`): top-k compression, clipping to [-b, b],
stochastic sign quantisation, sum over teachers, Gaussian noise, threshold. The student
moves its samples along the aggregate. All T teachers are one `jax.vmap`-ed computation
whose teacher axis is sharded over the device mesh and chunked to bound memory
(`teachers`); the public TensorFlow code instead runs teachers one at a time, swapping
batches of them in from checkpoints.

Privacy analysis (what the ledger records and why):
- Unit: one training example. It lies in exactly one teacher's partition, and the
  partition scheme (`partition`) guarantees that a neighbouring dataset changes only that
  partition: ``hash`` under add/remove-one, ``balanced`` under replace-one. The ledger
  states the relation of the scheme in use.
- A changed partition may change that teacher's training arbitrarily, hence its vote on
  any sample arbitrarily: the sensitivity is the largest L2 distance between two vote
  vectors of one teacher, in {-1, 0, +1}^D with exactly k non-zeros each: sqrt(4k)
  (derived in `topagg`; attained by equal supports with opposite signs). Every other
  teacher's vote has the same distribution on both datasets.
- One aggregation adds N(0, sigma^2) to each coordinate of the vote sum: a Gaussian
  mechanism with noise multiplier sigma / sqrt(4k), recorded as
  `GaussianDpEvent(sigma / sqrt(4k))`. With `vote_scope="sample"` a teacher votes on each
  generated sample (k non-zeros per sample) and a generator step is `batch_size`
  aggregations (the paper's and its public code's scope); with `vote_scope="batch"` (our
  variant, the table rows' setting) a teacher casts one k-sparse vote on the whole batch
  flattened, and a step is one aggregation. The samples, the
  generator and the teachers' state evolve with the released aggregates, which RDP
  composition covers (adaptive composition).
- Thresholding at beta * T is post-processing of the noisy sum: it costs nothing. The
  data-dependent bounds of the paper's code are not used; the guarantee is the
  data-independent composition of all Gaussian events, with eps from RDP (and PLD).
- No subsampling amplification: every teacher uses all of its partition, and all
  teachers vote on every sample. Teacher training itself releases nothing.
- The budget guard stops before the first generator step whose further events would
  take eps above the target.
- An empirical check of the above in one run: `--audit_canaries` (`canaries`: canary
  teachers' votes at the full sensitivity sqrt(4k) in every aggregation, scored on every
  release).
"""

from dpfed.generative import contract
from dpfed.generative.datalens.partition import (
    PARTITION_RELATIONS,
    partition_teachers,
    public_partition_sizes,
)
from dpfed.generative.datalens.teachers import VOTE_SCOPES, TeacherEnsemble, make_mesh
from dpfed.generative.datalens.topagg import TopAgg, teacher_vote
from dpfed.generative.datalens.training import (
    METHOD,
    DataLens,
    DataLensConfig,
    DataLensGenerator,
    load_generator,
    train,
)
from dpfed.models.datalens_nets import OUTPUTS as GENERATOR_OUTPUTS
from dpfed.train.config import ConfigError

contract.register_generator(METHOD, load_generator)

__all__ = [
    "METHOD",
    "PARTITION_RELATIONS",
    "ConfigError",
    "DataLens",
    "DataLensConfig",
    "DataLensGenerator",
    "GENERATOR_OUTPUTS",
    "TeacherEnsemble",
    "TopAgg",
    "VOTE_SCOPES",
    "load_generator",
    "make_mesh",
    "partition_teachers",
    "public_partition_sizes",
    "teacher_vote",
    "train",
]
