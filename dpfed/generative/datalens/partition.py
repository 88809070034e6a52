"""Disjoint teacher partitions for DataLens / PATE, each tied to the neighbouring relation
under which "one record changes one partition" holds.

The privacy argument of DataLens (Wang et al., CCS 2021) needs more than disjointness:
a neighbouring dataset must change the data of ONE teacher only, so the assignment of
every other record must not depend on the changed record. Two schemes keep that:

- ``hash`` (add/remove-one): record -> teacher by a keyed hash of the record's content
  (image bytes and label; the key is the public seed). Adding or removing a record adds
  or removes it in one partition and moves nothing else. Sizes are random (about
  Binomial(N, 1/T)); replacing a record may change two partitions.
- ``balanced`` (replace-one): a seeded, data-independent permutation of the N positions
  split into T parts whose sizes differ by at most one. Replacing the record at one
  position changes one partition; adding or removing a record would shift the split, so
  this scheme is accounted under replace-one only.

A class-balanced split (the public code's ``evenly_partition_dataset``) is NOT offered:
which teacher gets a record would depend on the labels of the other records, so changing
one label reshuffles many partitions. (The public code also reuses records of the
smaller classes, so its partitions are not even disjoint.)
"""

import hashlib

import numpy as np

PARTITION_RELATIONS = {"hash": "add_or_remove_one", "balanced": "replace_one"}


def partition_teachers(
    images: np.ndarray, labels: np.ndarray, num_teachers: int, seed: int, scheme: str = "hash"
) -> list[np.ndarray]:
    """Splits N examples into `num_teachers` disjoint index arrays covering all examples.

    Args:
      images: `[N, ...]` examples (hashed by the ``hash`` scheme).
      labels: `[N]` integer labels.
      num_teachers: T; at most N.
      seed: public seed of the hash key or the permutation.
      scheme: ``hash`` or ``balanced`` (see the module docstring).

    Returns:
      T sorted int64 index arrays; every example is in exactly one of them.

    Raises:
      ValueError: unknown scheme, or T < 1, or T > N (a teacher per example at most).
    """
    images, labels = np.asarray(images), np.asarray(labels)
    n = labels.shape[0]
    if images.shape[0] != n:
        raise ValueError(f"images ({images.shape[0]}) and labels ({n}) differ in length")
    if scheme not in PARTITION_RELATIONS:
        raise ValueError(f"scheme must be one of {tuple(PARTITION_RELATIONS)}, got {scheme!r}")
    if not 1 <= num_teachers <= n:
        raise ValueError(
            f"num_teachers={num_teachers} must be in [1, {n}]: the {n} training examples "
            "cannot be split into more disjoint non-reused partitions"
        )
    if scheme == "balanced":
        order = np.random.default_rng(seed).permutation(n)
        return [np.sort(part).astype(np.int64) for part in np.array_split(order, num_teachers)]
    # The 64-bit two's complement: the key of every seed in [-2**63, 2**63) is as it was
    # (signed bytes), and 64-bit seeds up to 2**64 (`seeds.root_key`) have one too.
    key = (seed % 2**64).to_bytes(8, "little")
    owner = np.empty(n, np.int64)
    for i in range(n):
        digest = hashlib.blake2b(images[i].tobytes(), digest_size=8, key=key)
        digest.update(np.int64(labels[i]).tobytes())
        owner[i] = int.from_bytes(digest.digest(), "little") % num_teachers
    order = np.argsort(owner, kind="stable")
    return np.split(order, np.cumsum(np.bincount(owner, minlength=num_teachers))[:-1])


def public_partition_sizes(scheme: str, num_examples: int, num_teachers: int) -> dict:
    """What a run may publish about its partition sizes: a function of N and T alone.

    ``balanced`` sizes are floor(N/T) and ceil(N/T) whatever the data. ``hash`` sizes
    count the records whose content hashes to each teacher: adding or removing one
    record changes one of them, so their exact values (min, max, ...) are statistics of
    the private data with no noise; only their expectation N/T is published. (N itself
    is treated as public, as in every ledger's `dataset_size`.)
    """
    if scheme not in PARTITION_RELATIONS:
        raise ValueError(f"scheme must be one of {tuple(PARTITION_RELATIONS)}, got {scheme!r}")
    if scheme == "balanced":
        return {"min": num_examples // num_teachers, "max": -(-num_examples // num_teachers)}
    return {"expected": num_examples / num_teachers}
