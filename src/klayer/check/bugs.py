"""The library of bug models: mistakes students make, each a switch in ``course``.

Every model names the mistake in plain words and the course's equation it breaks; it
applies at each layer where it can occur (``where``): "bn" at hidden layers with batch
norm, "hidden" at hidden layers, "linear" at every layer with weights, "square" where
W_l is square (a transposition changes no shape; "square_above": but layer 1), "top"
once (the output or the cost).
A ``Candidate`` is a set of (model, layer) switches; ``candidates`` lists all single
mistakes of a case, and ``switch`` turns a candidate into the ``on`` function of
``course``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from klayer.check.course import Case, On


@dataclass(frozen=True)
class BugModel:
    name: str
    words: str  # the mistake, in plain words
    equation: str  # the course's equation that it breaks
    where: str  # "bn", "hidden", "linear", "square" or "top"
    forward: bool = False  # a forward-pass mistake (changes the forward values)


BUG_MODELS = [
    BugModel("var_unbiased", "the batch variance is the unbiased one, 1/(n-1) instead of 1/n",
             "v_l = 1/n sum_i (s_i - mu_l)^2", "bn", True),
    BugModel("var_rescaled", "the batch variance is rescaled by (n-1)/n",
             "v_l = 1/n sum_i (s_i - mu_l)^2", "bn", True),
    BugModel("std_as_var", "the standard deviation is used where the variance belongs",
             "s^_l = diag(v_l + eps)^(-1/2) (s_l - mu_l)", "bn", True),
    BugModel("eps_outside_sqrt", "eps is added outside the square root in the forward pass "
             "but inside it in the backward pass", "s^_l = diag(v_l + eps)^(-1/2) (s_l - mu_l)",
             "bn", True),
    BugModel("sigma_first_unit", "every unit is divided by the first unit's sigma (a wrong "
             "broadcast, e.g. np.diag of an m x 1 column)",
             "s^_l = diag(v_l + eps)^(-1/2) (s_l - mu_l)", "bn", True),
    BugModel("sigma_first_unit_both", "every unit is divided by the first unit's sigma, in the "
             "forward and the backward pass", "sigma_1 = (v_l + eps)^(-1/2)", "bn", True),
    BugModel("b_for_beta", "the bias b_l is added where beta_l belongs",
             "s~_l = gamma_l . s^_l + beta_l", "bn", True),
    BugModel("no_relu", "the ReLU is left out: s~_l is passed to the next layer",
             "x_l = max(0, s~_l)", "hidden", True),
    BugModel("scores_passed_on", "the scores s_l are passed to the next layer instead of "
             "the ReLU's output", "x_l = max(0, s~_l)", "hidden", True),
    BugModel("softmax_twice", "the softmax is applied twice", "p = softmax(s_k)", "top", True),
    BugModel("bn_no_mean_term", "the batch-norm backward pass lacks its mean term",
             "G = G_1 - 1/n (G_1 1_n) 1_n^T - 1/n D . (c 1_n^T)", "bn"),
    BugModel("bn_no_var_term", "the batch-norm backward pass lacks its variance term D . c",
             "G = G_1 - 1/n (G_1 1_n) 1_n^T - 1/n D . (c 1_n^T)", "bn"),
    BugModel("c_not_summed", "c is not summed over the batch", "c = (G_2 . D) 1_n", "bn"),
    BugModel("sigma1_for_sigma2", "sigma_1 is used where sigma_2 belongs",
             "G_2 = G . (sigma_2 1_n^T), sigma_2 = (v + eps)^(-3/2)", "bn"),
    BugModel("gamma_beta_no_1_over_n", "the gamma and beta gradients lack the factor 1/n",
             "grad gamma_l = 1/n (G . s^_l) 1_n, grad beta_l = 1/n G 1_n", "bn"),
    BugModel("gamma_beta_scalar", "the gamma and beta gradients are summed to one number per "
             "layer", "grad gamma_l = 1/n (G . s^_l) 1_n (one entry per unit)", "bn"),
    BugModel("no_bn_backward", "the batch-norm backward pass is left out",
             "G = BatchNormBackPass(G, s_l, mu_l, v_l)", "bn"),
    BugModel("relu_mask_on_scores", "the ReLU's mask is taken on the scores s_l (before batch "
             "norm) instead of the ReLU's output", "G = G . Ind(x_l > 0)", "hidden"),
    BugModel("l2_lambda", "the L2 term is lambda W instead of 2 lambda W",
             "grad W_l = 1/n G x_{l-1}^T + 2 lambda W_l", "linear"),
    BugModel("l2_from_gradient", "the L2 term is built from the gradient instead of W",
             "grad W_l = 1/n G x_{l-1}^T + 2 lambda W_l", "linear"),
    BugModel("no_1_over_n", "the gradients of W and b lack the factor 1/n",
             "grad W_l = 1/n G x_{l-1}^T + 2 lambda W_l, grad b_l = 1/n G 1_n", "linear"),
    BugModel("double_1_over_n", "the factor 1/n is applied twice (G divided by n as well)",
             "G = -(Y - P), grad W_l = 1/n G x_{l-1}^T", "top"),
    BugModel("grad_W_transposed", "the weight gradient is transposed",
             "grad W_l = 1/n G x_{l-1}^T (m_l x m_{l-1})", "square"),
    BugModel("W_not_transposed", "G is propagated with W_l instead of its transpose",
             "G = W_l^T G", "square_above"),
]
COST_MODELS = [
    BugModel("cost_no_l2", "the cost lacks its L2 term", "J = 1/n sum_i l_i + lambda sum_l "
             "||W_l||^2", "top", True),
    BugModel("cost_l2_over_n", "the cost's L2 term is divided by n",
             "J = 1/n sum_i l_i + lambda sum_l ||W_l||^2", "top", True),
    BugModel("cost_not_squared", "the cost's L2 term sums |W| instead of W squared",
             "J = 1/n sum_i l_i + lambda sum_l ||W_l||^2", "top", True),
]
MODELS = {m.name: m for m in BUG_MODELS + COST_MODELS}

Candidate = tuple[tuple[str, int], ...]  # ((model name, layer), ...); layer 0: every layer


def layers_of(model: BugModel, case: Case) -> list[int]:
    """The layers of ``case`` where ``model`` can occur (0 stands for all of them)."""
    k = case.k
    hidden = list(range(1, k))
    square = [l for l in range(1, k + 1) if case.W[l - 1].shape[0] == case.W[l - 1].shape[1]]
    found = {
        "bn": hidden if case.batch_norm else [],
        "hidden": hidden,
        "linear": list(range(1, k + 1)),
        "square": square,
        "square_above": [l for l in square if l > 1],  # G is propagated below layer 1 only
        "top": [k],
    }[model.where]
    return found + ([0] if len(found) > 1 and not model.where.startswith("square") else [])


def candidates(case: Case, models: Iterable[BugModel] = BUG_MODELS) -> list[Candidate]:
    """Every single mistake of ``case``: each model at each of its layers, and at all."""
    return [((m.name, l),) for m in models for l in layers_of(m, case)]


def switch(candidate: Candidate, case: Case) -> On:
    """The ``on`` function of ``course.forward``/``backward`` for ``candidate``."""
    active: set[tuple[str, int]] = set()
    for name, l in candidate:
        every = [x for x in layers_of(MODELS[name], case) if x]
        active.update((name, x) for x in (every if l == 0 else [l]))
    return lambda name, l: (name, l) in active


def describe(candidate: Candidate, k: int) -> str:
    """One mistake per line, in plain words, with the layer and the course's equation."""
    lines = []
    for name, l in candidate:
        m = MODELS[name]
        where = ("" if m.where == "top" else " in every layer" if l == 0
                 else f" in layer {l}")
        lines.append(f"{m.words}{where}  [course: {m.equation}]")
    return "\n".join(lines)
