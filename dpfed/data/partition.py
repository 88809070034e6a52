"""Federated partitions of a centralised dataset, and their padded on-device form.

A partition is a list of index arrays, one per client (each example in exactly one
client, indices sorted within a client). `to_federated` turns it into padded arrays
`[clients, max_n, ...]` plus per-client counts, the form the jitted federated code
consumes: sampling and batching happen on device with `mask`.
"""

from __future__ import annotations

import dataclasses

import numpy as np

_MAX_DIRICHLET_DRAWS = 1000


@dataclasses.dataclass(frozen=True)
class FederatedData:
    """Client datasets padded to one shape.

    Attributes:
      images: `[clients, max_n, H, W, C]`, the dtype of the source images; padding is 0.
      labels: int32 `[clients, max_n]`; padding is 0.
      counts: int32 `[clients]`, the number of real examples of each client; client c's
        real examples are `images[c, :counts[c]]`.
    """

    images: np.ndarray
    labels: np.ndarray
    counts: np.ndarray

    @property
    def num_clients(self) -> int:
        return int(self.counts.shape[0])

    @property
    def max_n(self) -> int:
        """Slots per client (real examples plus padding)."""
        return int(self.labels.shape[1])

    @property
    def mask(self) -> np.ndarray:
        """Bool `[clients, max_n]`: True for real examples, False for padding."""
        return np.arange(self.max_n)[None, :] < self.counts[:, None]


def _check_num_clients(num_clients: int, num_examples: int) -> None:
    if not 0 < num_clients <= num_examples:
        raise ValueError(
            f"num_clients must be in [1, num_examples={num_examples}], got {num_clients}"
        )


def partition_iid(num_examples: int, num_clients: int, seed: int) -> list[np.ndarray]:
    """Splits examples uniformly at random into clients whose sizes differ by at most 1."""
    _check_num_clients(num_clients, num_examples)
    order = np.random.default_rng(seed).permutation(num_examples)
    return [np.sort(part) for part in np.array_split(order, num_clients)]


def _checked_labels(labels: np.ndarray, num_clients: int, alpha: float) -> np.ndarray:
    """`labels` as a 1-D array, after the checks both Dirichlet splits share."""
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    _check_num_clients(num_clients, labels.shape[0])
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    return labels


def _dirichlet_draw(
    labels: np.ndarray, num_clients: int, alpha: float, rng: np.random.Generator
) -> list[tuple[np.ndarray, np.ndarray]]:
    """One label-skewed draw: each class's examples, shuffled, with the cuts that split
    them over the clients by Dirichlet(alpha) shares (`np.split`'s indices)."""
    draw = []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        shares = rng.dirichlet(np.full(num_clients, alpha))
        cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
        draw.append((members, cuts))
    return draw


def _client_sizes(draw: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Each client's number of examples in `draw`, without building its index arrays."""
    return sum(np.diff(np.minimum(cuts, len(members)), prepend=0, append=len(members))
               for members, cuts in draw)


def _clients_of(draw: list[tuple[np.ndarray, np.ndarray]], num_clients: int) -> list[np.ndarray]:
    """Each client's sorted example indices in `draw`."""
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for members, cuts in draw:
        for client, chunk in enumerate(np.split(members, cuts)):
            parts[client].append(chunk)
    return [np.sort(np.concatenate(chunks)) for chunks in parts]


def partition_dirichlet(
    labels: np.ndarray, num_clients: int, alpha: float, seed: int, min_size: int = 1
) -> list[np.ndarray]:
    """Label-skewed partition: class k's examples go to clients in Dirichlet(alpha) shares.

    The per-class split of Yurochkin et al. 2019 ("Bayesian Nonparametric Federated
    Learning of Neural Networks"), the common label-skew benchmark (e.g. Li et al. 2022,
    "Federated Learning on Non-IID Data Silos"): small alpha gives clients few classes and
    very unequal sizes, large alpha approaches the IID label mix. The draw is repeated
    (same seeded stream) until every client has at least `min_size` examples; with many
    clients and a small alpha that may never happen (alpha 0.1 and 400 clients of 4,000
    examples): `partition_dirichlet_mix` skews labels at any client count.

    Raises:
      ValueError: on bad arguments, or if no draw in 1000 gives every client `min_size`.
    """
    labels = _checked_labels(labels, num_clients, alpha)
    if not 0 <= min_size * num_clients <= labels.shape[0]:
        raise ValueError(
            f"min_size={min_size} times num_clients={num_clients} must be in "
            f"[0, num_examples={labels.shape[0]}]"
        )
    rng = np.random.default_rng(seed)
    for _ in range(_MAX_DIRICHLET_DRAWS):
        draw = _dirichlet_draw(labels, num_clients, alpha, rng)
        if _client_sizes(draw).min() >= min_size:  # a rejected draw builds no arrays
            return _clients_of(draw, num_clients)
    raise ValueError(
        f"no Dirichlet draw in {_MAX_DIRICHLET_DRAWS} gave every client min_size={min_size} "
        f"examples (alpha={alpha}, num_clients={num_clients}); raise alpha or lower min_size"
    )


def _client_class_counts(
    size: int, mix: np.ndarray, left: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """How many examples of each class a client of `size` draws with class probabilities
    `mix`, from classes with `left` examples left: a class that runs out passes its draws
    to the classes left, in proportion to `mix` (or to what is left, where `mix` puts no
    mass on them)."""
    counts = np.zeros_like(left)
    while (short := size - counts.sum()) > 0:
        open_classes = left - counts > 0
        weights = np.where(open_classes, mix, 0.0)
        if not weights.sum() > 0:
            weights = (left - counts).astype(np.float64)
        drawn = rng.multinomial(short, weights / weights.sum())
        counts += np.minimum(drawn, left - counts)
    return counts


def partition_dirichlet_mix(
    labels: np.ndarray, num_clients: int, alpha: float, seed: int
) -> list[np.ndarray]:
    """Label-skewed partition: each client draws its class mix from Dirichlet(alpha * p).

    Hsu, Qi & Brown 2019 ("Measuring the Effects of Non-Identical Data Distribution for
    Federated Visual Classification"): client c's class probabilities q_c ~ Dir(alpha p),
    p the dataset's class frequencies, and its examples are drawn by q_c without
    replacement. Clients get equal sizes (differing by at most 1, as `partition_iid`), so
    no client is empty at any client count. Small alpha gives each client one or two
    classes; large alpha approaches the IID mix. Note the scale: the Dirichlet parameters
    sum to alpha here, to alpha x num_clients in `partition_dirichlet`. Clients are filled
    in turn: when a class runs out, a client's draws of it go to the classes left, so the
    last clients' mixes lean towards the classes left over.

    Raises:
      ValueError: on bad arguments.
    """
    labels = _checked_labels(labels, num_clients, alpha)
    rng = np.random.default_rng(seed)
    classes, inverse = np.unique(labels, return_inverse=True)
    members = [rng.permutation(np.flatnonzero(inverse == k)) for k in range(classes.size)]
    left = np.array([m.size for m in members])
    prior = left / left.sum()
    sizes = [part.size for part in np.array_split(np.arange(labels.shape[0]), num_clients)]
    parts = []
    for size in sizes:
        counts = _client_class_counts(size, rng.dirichlet(alpha * prior), left, rng)
        taken = [members[k][m.size - left[k]: m.size - left[k] + counts[k]]
                 for k, m in enumerate(members)]
        left = left - counts
        parts.append(np.sort(np.concatenate(taken)))
    return parts


def partition_natural(client_ids: np.ndarray) -> list[np.ndarray]:
    """Groups examples by a given owner id (writer, user, celebrity).

    Clients come in the order of `np.unique(client_ids)`; within a client the indices
    keep their original (increasing) order.
    """
    client_ids = np.asarray(client_ids)
    if client_ids.ndim != 1 or client_ids.shape[0] == 0:
        raise ValueError(f"client_ids must be a non-empty 1-D array, got shape {client_ids.shape}")
    _, inverse = np.unique(client_ids, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    sizes = np.bincount(inverse)
    return np.split(order, np.cumsum(sizes)[:-1])


def to_federated(
    images: np.ndarray,
    labels: np.ndarray,
    client_indices: list[np.ndarray],
    max_n: int | None = None,
) -> FederatedData:
    """Gathers each client's examples into padded `[clients, max_n, ...]` arrays.

    Args:
      images: `[N, H, W, C]` examples (any dtype; kept).
      labels: `[N]` integer labels.
      client_indices: one index array into the N examples per client.
      max_n: slots per client; defaults to the largest client. A client with more than
        `max_n` examples is an error: nothing is dropped silently.

    Raises:
      ValueError: on a client larger than `max_n`, an index out of range, or an example
        given to two clients (or twice to one): the unit of privacy, one user's data in
        one client, needs disjoint clients.
    """
    images, labels = np.asarray(images), np.asarray(labels)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"images ({images.shape[0]}) and labels ({labels.shape[0]}) differ")
    if not client_indices:
        raise ValueError("client_indices must hold at least one client")
    indices = [np.asarray(idx, dtype=np.int64).reshape(-1) for idx in client_indices]
    counts = np.array([idx.size for idx in indices], dtype=np.int32)
    if max_n is None:
        max_n = int(counts.max())
    if counts.max() > max_n:
        worst = int(counts.argmax())
        raise ValueError(
            f"max_n={max_n} is too small: client {worst} has {counts[worst]} examples; "
            "raise max_n or split that client"
        )
    flat = np.concatenate(indices)
    if flat.size and (flat.min() < 0 or flat.max() >= images.shape[0]):
        raise ValueError(f"client_indices must lie in [0, {images.shape[0]})")
    values, times = np.unique(flat, return_counts=True)
    if values.size != flat.size:
        repeated = int(values[times > 1][0])
        holders = [c for c, idx in enumerate(indices) if np.any(idx == repeated)]
        raise ValueError(
            f"example {repeated} is given {int(times[times > 1][0])} times (clients "
            f"{holders[:8]}): each example must be in exactly one client, once"
        )
    client = np.repeat(np.arange(len(indices)), counts)
    slot = np.arange(flat.size) - np.repeat(np.cumsum(counts) - counts, counts)
    fed_images = np.zeros((len(indices), max_n, *images.shape[1:]), dtype=images.dtype)
    fed_labels = np.zeros((len(indices), max_n), dtype=np.int32)
    fed_images[client, slot] = images[flat]
    fed_labels[client, slot] = labels[flat]
    return FederatedData(images=fed_images, labels=fed_labels, counts=counts)
