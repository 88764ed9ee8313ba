"""Sampling strategies: how the next token is drawn from a row's logits, each row with its own settings.

Temperature, top-k and top-p in the order transformers applies them, then one inverse-CDF draw per row. Nothing a
row gets depends on another row, so the engine can put any prompts side by side.
"""

from __future__ import annotations

import dataclasses
import numbers

import jax
import jax.numpy as jnp

from gpt2_jax.config import is_integer

TOP_K_STATIC = 64  # top_k values up to this draw among lax.top_k's entries; larger ones from all V


@dataclasses.dataclass(frozen=True)
class Sampler:
    """How the next token is drawn: temperature 0 = greedy; top_k 0 and top_p 1 switch those filters off."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        # An infinite temperature would silently sample uniformly; a string would fail in a comparison below.
        if not isinstance(self.temperature, numbers.Real) or not 0 <= self.temperature < float("inf"):
            raise ValueError(f"temperature must be >= 0 (0 = greedy) and finite; got {self.temperature!r}")
        if not is_integer(self.top_k, 0):
            raise ValueError(f"top_k must be an integer >= 0 (0 = off); got {self.top_k!r}")
        if not isinstance(self.top_p, numbers.Real) or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (1 = off); got {self.top_p!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def row(self) -> tuple[float, int, float]:
        """(1 / temperature, top_k, top_p) as a decode row takes them: 1 / temperature capped at 1e30 (float32
        would make it inf, and 0 * inf is NaN: greedy for such values), 0 for greedy."""
        inverse = 0.0 if self.greedy else min(1.0 / self.temperature, 1e30)
        return inverse, int(self.top_k), float(self.top_p)


def top_p_filter(logits_BK, top_p_B, weight_BK=None, iterations: int = 32):
    """Keep the smallest set of most probable entries whose probability reaches top_p_B (per row); the rest become
    -inf. weight_BK: how many entries of the same logit each one stands for (1 if None).

    Without sorting (a full sort of 50,257 logits per row costs more than a decode step on a CPU): bisect for the
    largest probability threshold t whose entries p >= t still hold top_p of the mass. Entries tied with the
    last one kept (to within 2**-32 of the largest probability) are kept with it.
    """
    weight_BK = jnp.ones_like(logits_BK) if weight_BK is None else weight_BK
    mass_BK = jax.nn.softmax(logits_BK + jnp.log(weight_BK), axis=-1)
    probs_BK = mass_BK / weight_BK

    def halve(_, bounds):
        low_B, high_B = bounds
        mid_B = (low_B + high_B) / 2
        enough_B = jnp.sum(jnp.where(probs_BK >= mid_B[:, None], mass_BK, 0.0), axis=-1) >= top_p_B
        return jnp.where(enough_B, mid_B, low_B), jnp.where(enough_B, high_B, mid_B)

    low_B, _ = jax.lax.fori_loop(0, iterations, halve, (jnp.zeros(probs_BK.shape[:1]), probs_BK.max(axis=-1)))
    return jnp.where(probs_BK >= low_B[:, None], logits_BK, -jnp.inf)


def draw(keys_B, logits_BK):
    """One index per row from softmax(logits) by inverse CDF: one uniform number per row instead of the K Gumbel
    numbers of jax.random.categorical (4x faster for 8 rows of 50,257 on a CPU). -inf entries are never drawn."""
    probs_BK = jax.nn.softmax(logits_BK.astype(jnp.float32), axis=-1)
    cdf_BK = jnp.cumsum(probs_BK, axis=-1)
    u_B = jax.vmap(jax.random.uniform)(keys_B) * cdf_BK[:, -1]
    index_B = jnp.sum(cdf_BK <= u_B[:, None], axis=-1)
    # Rounding can put u at the very top of the CDF: fall back to the last entry that can be drawn.
    K = logits_BK.shape[-1]
    last_B = K - 1 - jnp.argmax((probs_BK > 0)[:, ::-1], axis=-1)
    return jnp.minimum(index_B, last_B).astype(jnp.int32)


def by_row(f, *args_B):
    """f on each row of args_B alone (as a batch of 1), in a loop: a row's result can then never depend on the
    others. XLA:CPU orders a reduction over the minor axis by the whole array's shape (a cumsum over V does
    change with the number of rows); the loop costs little beside the decode step's matmuls."""
    return jax.lax.map(lambda row: jax.tree.map(lambda y: y[0], f(*(a[None] for a in row))), args_B)


def sample_rows(logits_BV, keys_B, inverse_temperature_B, top_k_B, top_p_B):
    """One token per row from float logits [B, V], each row with its own key and settings (Sampler.row(); an
    inverse temperature of 0 is greedy): int32 [B]. A row's token depends on its own logits, key and settings only:
    the argmax is exact, and the sampled rows are drawn one at a time (by_row).

    Order of the filters (as in transformers): temperature, top-k, top-p, then a draw from the renormalised rest.
    Top-k keeps every entry tied with the k-th largest (as transformers does: bfloat16 logits tie often), and a
    top_k of V or more keeps every entry. Top-p keeps the entries tied with the last one it needs too, where
    transformers keeps those that come first in its sort.
    """
    argmax_B = jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    greedy_B = inverse_temperature_B == 0

    def sampled(_):
        return by_row(_sample_filtered, logits_BV, keys_B, inverse_temperature_B, top_k_B, top_p_B)

    return jnp.where(greedy_B, argmax_B, jax.lax.cond(jnp.any(~greedy_B), sampled, lambda _: argmax_B, None))


def _sample_filtered(logits_BV, keys_B, inverse_temperature_B, top_k_B, top_p_B):
    """sample_rows after the greedy rows are set aside (a greedy row gets 0 here)."""
    greedy_B = inverse_temperature_B == 0
    # Shifted by the row's max first, so that a tiny temperature sends the rest towards -inf, not the max to inf.
    x_BV = logits_BV.astype(jnp.float32)
    x_BV = (x_BV - x_BV.max(axis=-1, keepdims=True)) * inverse_temperature_B[:, None]
    V = x_BV.shape[-1]
    few_B = ~greedy_B & (top_k_B > 0) & (top_k_B <= min(TOP_K_STATIC, V))
    many_B = ~greedy_B & ~few_B
    zeros_B = jnp.zeros(greedy_B.shape, jnp.int32)
    few = jax.lax.cond(jnp.any(few_B), lambda: _sample_top_k(x_BV, keys_B, top_k_B, top_p_B, few_B),
                       lambda: zeros_B)
    many = jax.lax.cond(jnp.any(many_B), lambda: _sample_all(x_BV, keys_B, top_k_B, top_p_B, many_B),
                        lambda: zeros_B)
    return jnp.where(few_B, few, many)


def _sample_top_k(x_BV, keys_B, top_k_B, top_p_B, active_B):
    """sample_rows for rows with 0 < top_k <= TOP_K_STATIC: filters and draws among the TOP_K_STATIC largest only
    (a draw over all V entries costs 2-5x more per decode step at 8 rows on a CPU), with the entries beyond them
    tied with the k-th counted in. Entries past a row's own k are -inf, which leaves its CDF as it was.

    The tie group of the k-th largest in the top k carries the weight of all its tied entries; a draw that lands
    in it picks one of them uniformly. Without ties this is a plain draw over the top k.
    """
    K = min(TOP_K_STATIC, x_BV.shape[-1])
    values_BK, index_BK = jax.lax.top_k(x_BV, K)
    in_k_BK = jnp.arange(K)[None, :] < top_k_B[:, None]
    # A masked min, not a column picked by k: indexing the top k makes XLA:CPU sort every row (70 ms against 1.4).
    kth_B = jnp.where(in_k_BK, values_BK, jnp.inf).min(axis=-1)
    at_kth_BK = (values_BK == kth_B[:, None]) & in_k_BK
    tied_BV = x_BV == kth_B[:, None]
    tied_B, in_top_B = jnp.sum(tied_BV, axis=-1), jnp.sum(at_kth_BK, axis=-1)  # in all V, in the top k
    weight_BK = jnp.where(at_kth_BK, (tied_B / jnp.maximum(in_top_B, 1))[:, None], 1.0)
    values_BK = jnp.where(in_k_BK, values_BK, -jnp.inf)
    filtered_BK = top_p_filter(values_BK, top_p_B, weight_BK)
    values_BK = jnp.where((top_p_B < 1.0)[:, None], filtered_BK, values_BK)
    choice_B = draw(keys_B, values_BK + jnp.log(weight_BK))
    token_B = jnp.take_along_axis(index_BK, choice_B[:, None], axis=-1)[:, 0]
    beyond_B = (jnp.take_along_axis(at_kth_BK, choice_B[:, None], axis=-1)[:, 0] & (tied_B > in_top_B)
                & active_B)

    def pick_tied(token_B):  # the r-th entry tied with the k-th, r uniform (a cumsum over V: only when needed)
        r_B = jax.vmap(lambda key, n: jax.random.randint(jax.random.fold_in(key, 1), (), 0, n))(keys_B, tied_B)
        tied_index_B = jnp.argmax(jnp.cumsum(tied_BV, axis=-1) > r_B[:, None], axis=-1)
        return jnp.where(beyond_B, tied_index_B, token_B)

    return jax.lax.cond(jnp.any(beyond_B), pick_tied, lambda t: t, token_B).astype(jnp.int32)


def _kth_largest_key(key_BV, k_B):
    """The k-th largest of each row of uint32 keys, exactly: bisection on the key's 32 bits."""
    def halve(_, bounds):
        low_B, high_B = bounds
        gap_B = high_B - low_B
        mid_B = low_B + gap_B // 2 + gap_B % 2
        enough_B = jnp.sum(key_BV >= mid_B[:, None], axis=-1) >= k_B
        return jnp.where(enough_B, mid_B, low_B), jnp.where(enough_B, high_B, mid_B - 1)

    B = key_BV.shape[0]
    low_B, _ = jax.lax.fori_loop(0, 32, halve, (jnp.zeros(B, jnp.uint32), jnp.full(B, 2**32 - 1, jnp.uint32)))
    return low_B


def _sample_all(x_BV, keys_B, top_k_B, top_p_B, active_B):
    """sample_rows for rows with top_k 0 or above TOP_K_STATIC: the filters over all V entries, then a draw."""
    bits_BV = jax.lax.bitcast_convert_type(x_BV, jnp.int32)
    # float32 order as unsigned integer order: negative floats have their bits reversed, the sign bit flipped.
    key_BV = jax.lax.bitcast_convert_type(jnp.where(bits_BV < 0, ~bits_BV, bits_BV ^ jnp.int32(-2**31)),
                                          jnp.uint32)
    k_B = jnp.minimum(top_k_B, x_BV.shape[-1])
    cut_B = active_B & (k_B > 0)

    def top_k(x_BV):
        kth_B = _kth_largest_key(key_BV, k_B)
        return jnp.where(cut_B[:, None] & (key_BV < kth_B[:, None]), -jnp.inf, x_BV)

    x_BV = jax.lax.cond(jnp.any(cut_B), top_k, lambda x: x, x_BV)
    nucleus_B = active_B & (top_p_B < 1.0)
    x_BV = jax.lax.cond(jnp.any(nucleus_B),
                        lambda x: jnp.where(nucleus_B[:, None], top_p_filter(x, top_p_B), x), lambda x: x, x_BV)
    return draw(keys_B, x_BV)


def logprob_outputs(logits_BV, token_B, K: int):
    """(log-probability of token [B], top-K token ids [B, K], their log-probabilities [B, K]): float32 log-softmax
    of the raw logits, the most likely first."""
    logprobs_BV = jax.nn.log_softmax(logits_BV.astype(jnp.float32), axis=-1)
    chosen_B = jnp.take_along_axis(logprobs_BV, token_B[:, None], axis=-1)[:, 0]
    top_lp_BK, top_ids_BK = jax.lax.top_k(logprobs_BV, K)
    return chosen_B, top_ids_BK.astype(jnp.int32), top_lp_BK
