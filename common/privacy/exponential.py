"""The token-level exponential mechanism: each prompt token x is replaced by a token y drawn from a
fixed, public output set O with probability

    P(y | x) = exp(ε·u(x, y) / (2Δu)) / Σ_{y'∈O} exp(ε·u(x, y') / (2Δu))

where u is a bounded similarity of the two tokens' rows in a public embedding table and Δu its
range (so |u(x, y) − u(x', y)| ≤ Δu for every x, x', y):

* ``euclidean``: u = −min(‖e_x − e_y‖, D), D the clip (Δu = D). D = 0 picks the median pairwise
  distance of the output set's embeddings: a function of the public table only.
* ``cosine``: u = cos(e_x, e_y) ∈ [−1, 1] (Δu = 2).

The guarantee (McSherry & Talwar): for any two input tokens x, x' and any y ∈ O,
P(y | x) ≤ e^ε · P(y | x'); with ε = 0 every y ∈ O is equally likely; as ε → ∞ the draw
concentrates on the most similar output (x itself when x ∈ O). A prompt whose k tokens are
perturbed is kε-DP by sequential composition.

Which tokens pass through unchanged is explicit and public: the tokenizer's special tokens and the
tokens of an allow-list of template words. Everything else, digits and names included, is
perturbed and paid for. Digits can never be allow-listed.

``candidates = "knn"`` (what the public PDSS code does) draws from the K nearest outputs of x
only. That is *not* ε-DP over arbitrary inputs (an output outside x's neighbourhood rules x out),
so it is an option with its weaker guarantee stated, never the default.

Randomness comes from the OS (``np.random.default_rng()`` with no seed draws OS entropy); a
``seed`` exists only for tests. One Gumbel-max draw samples a whole batch of tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np

from common.errors import ConfigError

UTILITIES = ("euclidean", "cosine")
CANDIDATES = ("all", "knn")


def guarantee(epsilon: float, candidates: str = "all", knn: int = 0) -> str:
    """The per-token guarantee of the mechanism, as the model card states it."""
    if math.isinf(epsilon):
        return "none: epsilon = inf, prompts are sent unperturbed (a non-private baseline)"
    if candidates == "knn":
        return (f"weaker than {epsilon:g}-DP per token: each token is drawn from its own {knn} nearest "
                f"neighbours, so two tokens are {epsilon:g}-indistinguishable only if their neighbourhoods "
                "coincide; for other pairs there is no bound (an output outside one token's neighbourhood "
                "rules that token out)")
    return (f"{epsilon:g}-DP per perturbed token over a fixed public output set (any two input tokens, "
            f"any output: probability ratio <= e^{epsilon:g}); a prompt with k perturbed tokens is "
            f"{epsilon:g}*k-DP, given its public skeleton (its length and where special and allow-listed "
            "template tokens stand, which pass through unperturbed and are revealed)")


def fixed_length_guarantee(epsilon: float, length: int, candidates: str = "all", knn: int = 0) -> str:
    """The guarantee of a prompt cut or padded to ``length`` tokens with every one perturbed
    (:func:`fixed_length`, :meth:`TokenExponentialMechanism.perturbing_every_token`)."""
    if math.isinf(epsilon):
        return guarantee(epsilon)
    per_token = guarantee(epsilon, candidates, knn).split(";")[0]
    return (f"{per_token}; every prompt is exactly {length} tokens, all perturbed (none passes through), so a "
            f"prompt is {epsilon:g}*{length} = {epsilon * length:g}-DP with respect to any two inputs: neither its "
            "length nor any token left as it was carries the input")


def fixed_length(ids: list[int], length: int, filler: int) -> list[int]:
    """``ids`` cut, or padded with the public ``filler`` id, to exactly ``length`` tokens: perturbed at
    every position, the release then shows neither the input's length nor where anything stood."""
    ids = list(ids[:length])
    return ids + [int(filler)] * (length - len(ids))


def check_epsilon(epsilon, allow_zero: bool = False) -> float:
    """A per-token ε: > 0, or inf (no perturbation). ε = 0 (uniform output, nothing learnt from x)
    is a valid mechanism but sends pure noise, so only the mechanism itself accepts it."""
    bad = isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or math.isnan(epsilon)
    if bad or epsilon < 0 or (epsilon == 0 and not allow_zero):
        raise ConfigError(f"per-token epsilon must be > 0 (or inf for no perturbation), got {epsilon!r}")
    return float(epsilon)


@dataclass
class TokenExponentialMechanism:
    """The mechanism over one tokenizer's ids. ``embeddings``: the public (vocab, dim) table."""

    embeddings: np.ndarray
    epsilon: float
    output_ids: np.ndarray | None = None     # the public output set; None: every id not passed through as special
    passthrough_ids: frozenset = frozenset()  # special tokens + allow-listed template tokens
    special_ids: frozenset = frozenset()      # never in the output set (an EOS mid-prompt helps nobody)
    utility: str = "euclidean"
    distance_clip: float = 0.0                # euclidean only; 0: median pairwise distance of the output set
    candidates: str = "all"
    knn: int = 0
    seed: int | None = None                   # tests only; production draws OS entropy
    _rng: np.random.Generator = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.epsilon = check_epsilon(self.epsilon, allow_zero=True)
        if self.utility not in UTILITIES:
            raise ConfigError(f"perturb-utility must be one of {', '.join(UTILITIES)}, got {self.utility!r}")
        if self.candidates not in CANDIDATES:
            raise ConfigError(f"perturb-candidates must be one of {', '.join(CANDIDATES)}, got {self.candidates!r}")
        self.embeddings = np.asarray(self.embeddings, dtype=np.float64)
        vocab = self.embeddings.shape[0]
        if self.output_ids is None:
            self.output_ids = np.array([i for i in range(vocab) if i not in self.special_ids], dtype=np.int64)
        self.output_ids = np.asarray(self.output_ids, dtype=np.int64)
        if self.output_ids.size < 2 or self.output_ids.min() < 0 or self.output_ids.max() >= vocab:
            raise ConfigError(f"the output set needs at least 2 token ids in [0, {vocab}); got {self.output_ids.size}")
        if self.candidates == "knn" and not 1 <= self.knn <= self.output_ids.size:
            raise ConfigError(f"perturb-knn must be in [1, {self.output_ids.size}] with candidates = knn, got {self.knn}")
        self._out = self.embeddings[self.output_ids]
        if self.utility == "euclidean":
            if self.distance_clip < 0 or not math.isfinite(self.distance_clip):
                raise ConfigError(f"perturb-distance-clip must be ≥ 0 (0: automatic), got {self.distance_clip}")
            if self.distance_clip == 0:
                self.distance_clip = float(np.median(_distances(self._out, self._out)))
            self.sensitivity = float(self.distance_clip)
        else:
            self.sensitivity = 2.0
        self._rng = np.random.default_rng(self.seed)  # seed None: OS entropy

    # ------------------------------------------------------------------ the distribution
    def utilities(self, token_ids, clipped: bool = True) -> np.ndarray:
        """u(x, y) for each x in ``token_ids`` and each y of the output set: (n, |O|)."""
        x = self.embeddings[np.asarray(token_ids, dtype=np.int64)]
        if self.utility == "euclidean":
            d = _distances(x, self._out)
            return -np.minimum(d, self.distance_clip) if clipped else -d
        norms = np.linalg.norm(x, axis=1, keepdims=True) * np.linalg.norm(self._out, axis=1)[None, :]
        with _one_blas_thread():
            dots = x @ self._out.T
        return np.clip(dots / np.maximum(norms, 1e-12), -1.0, 1.0)

    def logits(self, token_ids) -> np.ndarray:
        scores = self.epsilon * self.utilities(token_ids) / (2.0 * self.sensitivity)
        if self.candidates == "knn":  # outside the K nearest (by the unclipped similarity): probability 0
            u = self.utilities(token_ids, clipped=False)
            kth = -np.partition(-u, self.knn - 1, axis=1)[:, self.knn - 1:self.knn]
            scores = np.where(u >= kth, scores, -np.inf)
        return scores

    def probabilities(self, token_ids) -> np.ndarray:
        """The exact output distribution over ``output_ids`` for each input token: (n, |O|)."""
        z = self.logits(token_ids)
        z = z - z.max(axis=1, keepdims=True)
        p = np.exp(z)
        return p / p.sum(axis=1, keepdims=True)

    # ------------------------------------------------------------------ sampling
    def passes(self, token_id: int) -> bool:
        return int(token_id) in self.passthrough_ids

    def tokens_perturbed(self, ids) -> int:
        """How many of a prompt's tokens the mechanism perturbs (and the ledger charges)."""
        return sum(not self.passes(t) for t in ids)

    def perturb_batch(self, prompts: list[list[int]]) -> list[list[int]]:
        """Perturb every non-pass-through token of every prompt: one sampling call for the batch."""
        flat = np.array([t for ids in prompts for t in ids], dtype=np.int64)
        out = flat.copy()
        mask = np.array([not self.passes(t) for t in flat], dtype=bool)
        if mask.any() and math.isfinite(self.epsilon):
            # Gumbel-max: argmax(logits + Gumbel noise) is an exact draw from softmax(logits).
            z = self.logits(flat[mask])
            out[mask] = self.output_ids[np.argmax(z + self._rng.gumbel(size=z.shape), axis=1)]
        result, start = [], 0
        for ids in prompts:
            result.append(out[start:start + len(ids)].tolist())
            start += len(ids)
        return result

    def perturbing_every_token(self) -> "TokenExponentialMechanism":
        """The same mechanism with nothing passing through (special and allow-listed ids are perturbed
        too): for inputs whose every token is a function of the private record, as a rewrite is."""
        return replace(self, passthrough_ids=frozenset())

    def guarantee(self) -> str:
        return guarantee(self.epsilon, self.candidates, self.knn)

    def describe(self) -> dict:
        """The public parameters, for the ledger entry and the privacy card."""
        return {"epsilon_token": self.epsilon, "utility": self.utility, "sensitivity": self.sensitivity,
                "output_set": int(self.output_ids.size), "passthrough": len(self.passthrough_ids),
                "candidates": self.candidates, "knn": self.knn, "guarantee": self.guarantee()}


def _distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    with _one_blas_thread():
        sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.sqrt(np.maximum(sq, 0.0))


def _one_blas_thread():
    """numpy's BLAS on one thread. Its thread pool, entered from a ServerApp thread of a process
    that also runs the Simulation Engine, was seen spinning forever in exec_blas (a 100 × 100
    product, 20 minutes); one thread computes these small products inline and cannot wait on it."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="blas")


def passthrough_ids(tokenizer, allow_words: list[str]) -> tuple[frozenset, frozenset]:
    """(pass-through ids, special ids) of a HF tokenizer: its special tokens + each allow-listed
    word's single-token forms ("word" and " word"). A word that is not a single token is refused:
    passing its pieces would pass the same pieces inside private words."""
    special = frozenset(int(i) for i in tokenizer.all_special_ids)
    allowed = set(special)
    for word in allow_words:
        if any(ch.isdigit() for ch in word):
            raise ConfigError(f"allow-list word {word!r} holds a digit; digits are always perturbed")
        forms = [tokenizer.encode(w, add_special_tokens=False) for w in (word, " " + word)]
        single = [ids[0] for ids in forms if len(ids) == 1]
        if not single:
            raise ConfigError(f"allow-list word {word!r} is not a single token of this tokenizer "
                              f"({forms[0]}); remove it from perturb-allow-list")
        allowed.update(single)
    return frozenset(allowed), special
