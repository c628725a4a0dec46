"""Step-cost models fitted online from measured step times (no torch, no numpy).

`OnlineLinearModel` fits y ~ theta . x by exponentially weighted least squares with a
small ridge pull towards a prior, re-solved from its normal equations on demand. The
features are scaled by typical magnitudes before the ridge applies, so a direction the
data never excites (say, per-token cost while every step has one token) is split by
the ridge in favour of the large-scale features staying small: one sequence decoding
alone is attributed to the constant term, not to "per token".

`StepCostModel` holds the two fits the controller needs:

    target_time = c0 + c_tok * batched_tokens + c_draft * verify_tokens + c_ctx * context_tokens
    draft_time  = d_first + d_fwd * draft_forwards + d_tok * draft_tokens

where verify_tokens are the drafts among the batched tokens, context_tokens = sum over
sequences of the KV length their queries read, and a
draft forward is one call of the draft model (the catch-up forward, then one per
extra draft position), so a draft step by batch size b costs d_fwd + d_tok * b. A
step where nobody speculates runs no draft forward at all.

d_first is what a step's first draft forward costs beyond the others (it builds its
input and sends its drafts to the host; later draft forwards of plain-greedy windows
reuse the input and keep their drafts on the device). Measured on the built-in pair at
one request: the draft's time per step at depth 1..4 was 0.81, 1.54, 2.15, 2.67 ms,
increments of 0.73, 0.61, 0.52; without d_first the fit charged every further draft
position 0.70-0.78 ms, and the controller chose k = 2 where k = 4 paid more. It has a
ridge of its own (FIRST_FORWARD_RIDGE): where every step that runs the draft has the
same depth, d_first and d_fwd cannot be told apart, and the ridge then gives the sum to
d_fwd, charging deeper drafts as the old fit did.

c_draft is what a verified draft costs beyond any other token. With one per-token term,
fitted over prefill chunks too, a window token looked cheap: on the built-in pair on
CPU, at 64 requests, a k = 1 step added 0.18 ms per window token where the term said
0.10, and the fit made up the difference in its constant, putting the k = 0 step at
17-19 ms where 14-16 were measured; so speculating looked like it paid. c_draft has a
ridge of its own (WINDOW_RIDGE) that holds it near 0 until verification steps show
otherwise. While nobody speculates it is not observed, and as the old steps' weight
decays the ridge would pull it back to 0 (drafts would look cheap again after a few
hundred steps); so each step with verified drafts moves the ridge's target to the
current fit, and c_draft keeps what it last learned.
"""

from __future__ import annotations

from dataclasses import dataclass


class OnlineLinearModel:
    """Exponentially weighted ridge least squares over a few features."""

    def __init__(
        self,
        scales: list[float],
        prior: list[float] | None = None,
        ridge: float | list[float] = 1e-3,
        decay: float = 0.98,
    ) -> None:
        """scales: typical magnitude of each feature (> 0); prior: coefficients the
        ridge pulls towards (default 0); ridge: its strength in scaled units, one for all
        features or one each; decay in (0, 1]: weight of the past per update."""
        if not scales or any(s <= 0 for s in scales):
            raise ValueError(f"scales must be positive, got {scales}")
        n = len(scales)
        ridges = [ridge] * n if isinstance(ridge, int | float) else list(ridge)
        if not 0 < decay <= 1 or len(ridges) != n or any(r <= 0 for r in ridges):
            raise ValueError(f"need 0 < decay <= 1 and {n} ridges > 0, got {decay}, {ridge}")
        self.scales = list(scales)
        self.prior = list(prior) if prior is not None else [0.0] * n
        if len(self.prior) != n:
            raise ValueError(f"prior has {len(self.prior)} entries for {n} features")
        self.ridge = ridges
        self.decay = decay
        self._xx = [[0.0] * n for _ in range(n)]  # sum of w * z z^T, z = x / scales
        self._xy = [0.0] * n  # sum of w * z y
        self.num_observations = 0
        self._coef: list[float] | None = None

    def observe(self, x: list[float], y: float) -> None:
        """One measurement y of features x."""
        z = self._scaled(x)
        d = self.decay
        for i, zi in enumerate(z):
            row = self._xx[i]
            for j, zj in enumerate(z):
                row[j] = d * row[j] + zi * zj
            self._xy[i] = d * self._xy[i] + zi * y
        self.num_observations += 1
        self._coef = None

    @property
    def coef(self) -> list[float]:
        """Coefficients in the features' own units (re-solved after new data)."""
        if self._coef is None:
            n = len(self.scales)
            prior_z = [p * s for p, s in zip(self.prior, self.scales, strict=True)]
            a = [
                [self._xx[i][j] + (self.ridge[i] if i == j else 0.0) for j in range(n)]
                for i in range(n)
            ]
            b = [self._xy[i] + self.ridge[i] * prior_z[i] for i in range(n)]
            theta_z = solve(a, b)
            self._coef = [t / s for t, s in zip(theta_z, self.scales, strict=True)]
        return self._coef

    def predict(self, x: list[float]) -> float:
        return sum(c * xi for c, xi in zip(self.coef, x, strict=True))

    def set_prior(self, i: int, value: float) -> None:
        """Move the value the ridge pulls coefficient i towards."""
        self.prior[i] = value
        self._coef = None

    def _scaled(self, x: list[float]) -> list[float]:
        if len(x) != len(self.scales):
            raise ValueError(f"expected {len(self.scales)} features, got {len(x)}")
        return [xi / s for xi, s in zip(x, self.scales, strict=True)]


def solve(a: list[list[float]], b: list[float]) -> list[float]:
    """x with a x = b, by Gaussian elimination with partial pivoting (a: n x n, regular)."""
    n = len(b)
    m = [list(row) + [bi] for row, bi in zip(a, b, strict=True)]
    for col in range(n):
        piv = max(range(col, n), key=lambda r: abs(m[r][col]))
        if m[piv][col] == 0:
            raise ValueError("singular system")
        m[col], m[piv] = m[piv], m[col]
        for r in range(col + 1, n):
            f = m[r][col] / m[col][col]
            if f:
                for c in range(col, n + 1):
                    m[r][c] -= f * m[col][c]
    x = [0.0] * n
    for r in range(n - 1, -1, -1):
        x[r] = (m[r][n] - sum(m[r][c] * x[c] for c in range(r + 1, n))) / m[r][r]
    return x


OUTLIER = 3.0  # measured / predicted time beyond which a measurement is clipped
MIN_FIT = 16  # observations before clipping applies


def _clip(model: OnlineLinearModel, x: list[float], y: float) -> float:
    if model.num_observations < MIN_FIT:
        return y
    return min(y, OUTLIER * max(model.predict(x), 0.0) + 1e-4)


WINDOW_RIDGE = 1.0  # pull of the verified-draft term towards 0, in scaled units
FIRST_FORWARD_RIDGE = 1.0  # pull of the draft's first-forward term towards 0, ditto


@dataclass(slots=True)
class StepFeatures:
    """What a step computed, as the cost model sees it."""

    batched_tokens: int  # target query tokens: chunks + decode tokens + drafts
    context_tokens: int  # sum over sequences of the KV length their queries read
    draft_forwards: int  # draft-model calls (0 without a draft model)
    draft_tokens: int  # tokens over all draft-model calls
    verify_tokens: int = 0  # of batched_tokens, the drafts verified

    def draft_x(self) -> list[float]:
        """The draft fit's features (for a step where the draft model runs): 1, draft
        forwards, draft tokens."""
        return [1.0, float(self.draft_forwards), float(self.draft_tokens)]

    def target_x(self) -> list[float]:
        """The target fit's features: 1, tokens, verified drafts, context tokens."""
        return [
            1.0,
            float(self.batched_tokens),
            float(self.verify_tokens),
            float(self.context_tokens),
        ]


@dataclass(slots=True)
class MarginalCosts:
    """The cost model's view of one step, linear in the controller's choices."""

    base_time: float  # predicted seconds with k = 0 everywhere (no draft model runs)
    per_draft_token: float  # target seconds per verified draft (one more query token,
    # one more context token)
    draft_catch_up: float = 0.0  # draft seconds of its catch-up forward, paid once when
    # any sequence speculates (0 for n-gram)
    per_draft_forward: float = 0.0  # draft seconds per draft forward after the first
    per_draft_row: float = 0.0  # draft seconds per token in those forwards


class StepCostModel:
    """Target and draft step times, fitted online (see the module docstring)."""

    def __init__(self, decay: float = 0.98) -> None:
        # a verified draft costs the per-token term plus this one's, held near 0 unless
        # the data insist (while nobody speculates it is not observed at all)
        self.target = OnlineLinearModel(
            [1.0, 64.0, 64.0, 4096.0], ridge=[1e-3, 1e-3, WINDOW_RIDGE, 1e-3], decay=decay
        )
        # the draft: a first-forward term (what a step's first draft forward costs beyond
        # the others), held at 0 unless depths vary (see the module docstring)
        self.draft = OnlineLinearModel(
            [1.0, 1.0, 64.0], ridge=[FIRST_FORWARD_RIDGE, 1e-3, 1e-3], decay=decay
        )

    @property
    def ready(self) -> bool:
        """Whether any step was measured yet (before that, nothing is predicted)."""
        return self.target.num_observations > 0

    def observe(self, f: StepFeatures, target_time_s: float, draft_time_s: float) -> None:
        """One measured step. Once the target's fit has some data, a time beyond
        OUTLIER x its prediction counts as OUTLIER x the prediction: a step stalled by
        another process on the same cores says little about what the next step costs.
        Draft times are not clipped: their per-token term is often unexcited (a catch-up
        forward over a large backlog is rare), and clipping that step would hide it."""
        x_target = f.target_x()
        self.target.observe(x_target, _clip(self.target, x_target, target_time_s))
        if f.verify_tokens:
            self.target.set_prior(2, max(self.target.coef[2], 0.0))
        if f.draft_forwards:
            self.draft.observe(f.draft_x(), draft_time_s)

    def predict(self, f: StepFeatures) -> float:
        """Predicted seconds of a step (target + draft), never below 0."""
        t = self.target.predict(f.target_x())
        d = self.draft.predict(f.draft_x()) if f.draft_forwards else 0.0
        return max(t, 0.0) + max(d, 0.0)

    def marginal(self, base: StepFeatures, catch_up_tokens: float | None) -> MarginalCosts:
        """Costs around a step with k = 0 everywhere (`base`, no draft forwards).
        catch_up_tokens: what the draft model's catch-up forward would compute if it
        ran (None: no draft model). Per-unit costs are clipped at 0: a noisy fit must
        not make drafts look cheaper than free."""
        _, c_tok, c_draft, c_ctx = self.target.coef
        catch_up = d_fwd = d_tok = 0.0
        if catch_up_tokens is not None:
            d_first, d_fwd, d_tok = (max(c, 0.0) for c in self.draft.coef)
            catch_up = d_first + d_fwd + d_tok * catch_up_tokens
        return MarginalCosts(
            base_time=max(self.predict(base), 1e-9),
            # one more query token and one more context token: clip the sum, not each
            # term (tokens and context are collinear at a fixed batch; each alone is noisy)
            per_draft_token=max(c_tok + c_draft + c_ctx, 0.0),
            draft_catch_up=catch_up,
            per_draft_forward=d_fwd,
            per_draft_row=d_tok,
        )
