"""A stacked-LSTM language model (char- or word-level), for federated text debugging.

The text model of "Generative Models for Effective ML on Private, Decentralized
Datasets" (Augenstein et al., ICLR 2020) is an LSTM LM trained with DP-FedAvg; the LEAF
Shakespeare benchmark (Caldas et al. 2018) uses a char LSTM: embedding 8, two LSTM
layers of 256. Both widths are attributes here (the CPU demo shrinks them).

`__call__` runs whole sequences (training); `step` advances one token with an explicit
carry (sampling). Both use the same cells, so stepping through a sequence gives the
same logits as running it at once (tested).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

Carry = tuple[tuple[jax.Array, jax.Array], ...]


class LstmLM(nn.Module):
    """Token ids `[B, T]` -> next-token logits `[B, T, vocab_size]`.

    Attributes:
      vocab_size: number of token ids (specials included).
      embed_dim: token embedding width.
      hidden: LSTM width.
      num_layers: stacked LSTM layers.
    """

    vocab_size: int
    embed_dim: int = 8
    hidden: int = 256
    num_layers: int = 2

    def setup(self):
        self.embed = nn.Embed(self.vocab_size, self.embed_dim)
        self.cells = [
            nn.OptimizedLSTMCell(self.hidden, name=f"lstm_{i}") for i in range(self.num_layers)
        ]
        self.rnns = [nn.RNN(cell) for cell in self.cells]
        self.out = nn.Dense(self.vocab_size)

    def __call__(self, ids: jax.Array) -> jax.Array:
        x = self.embed(ids)
        for rnn in self.rnns:
            # Zeros computed from the input, so that under `shard_map` (the federated
            # engine) the carry varies over the mesh like the data it is combined with.
            zeros = jnp.broadcast_to(x[:, 0, :1] * 0.0, (x.shape[0], self.hidden))
            x = rnn(x, initial_carry=(zeros, zeros))
        return self.out(x)

    def initial_carry(self, batch_size: int) -> Carry:
        """All-zero LSTM states for `batch_size` sequences."""
        zeros = jnp.zeros((batch_size, self.hidden), jnp.float32)
        return tuple((zeros, zeros) for _ in range(self.num_layers))

    def step(self, carry: Carry, tokens: jax.Array) -> tuple[Carry, jax.Array]:
        """One token per sequence `[B]` -> (new carry, next-token logits `[B, vocab]`)."""
        x = self.embed(tokens)
        new_carry = []
        for cell_carry, cell in zip(carry, self.cells, strict=True):
            cell_carry, x = cell(cell_carry, x)
            new_carry.append(cell_carry)
        return tuple(new_carry), self.out(x)
