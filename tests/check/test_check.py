"""klayer check: a student's own gradients, right and wrong, diagnosed by reproduction.

``student_gradients`` below is written the way students write the assignment (columns,
np.diag, one function), with each known mistake behind a switch. It shares no code
with klayer's bug models: the checker must recognise each mistake from the gradients.
"""

from __future__ import annotations

import numpy as np
import pytest

from klayer.check import check_function, check_step, compare, load_case, make_case, save_case
from klayer.check.bugs import BUG_MODELS, COST_MODELS, MODELS, layers_of
from klayer.check.course import backward, forward
from klayer.check.diagnose import TOL
from klayer.core.config import NetConfig
from klayer.core.network import Network


def student_gradients(X, Y, W, b, gamma, beta, lam, eps, mistakes=()):
    """A student's ComputeGradients with ``mistakes``, (name, layer) pairs (layer 0:
    everywhere)."""
    k, n = len(W), X.shape[1]

    def here(name, l):
        return any(bug == name and at in (0, l) for bug, at in mistakes)

    Xs, Ss, Shats, mus, vs = [X], [], [], [], []
    for l in range(k - 1):
        s = W[l] @ Xs[-1] + b[l]
        Ss.append(s)
        if gamma:
            mu = np.mean(s, axis=1, keepdims=True)
            v = np.var(s, axis=1, ddof=1 if here("var_unbiased", l + 1) else 0, keepdims=True)
            if here("var_rescaled", l + 1):
                v = v * (n - 1) / n
            if here("std_as_var", l + 1):
                v = np.std(s, axis=1, keepdims=True)
            if here("eps_outside_sqrt", l + 1):
                s_hat = np.diag(1 / (np.sqrt(v[:, 0]) + eps)) @ (s - mu)
            elif here("sigma_first_unit", l + 1) or here("sigma_first_unit_both", l + 1):
                s_hat = (s - mu) * np.diag(v + eps) ** -0.5  # np.diag of a column: v[0]
            else:
                s_hat = np.diag((v[:, 0] + eps) ** -0.5) @ (s - mu)
            s_tilde = gamma[l] * s_hat + (b[l] if here("b_for_beta", l + 1) else beta[l])
            mus.append(mu)
            vs.append(v)
            Shats.append(s_hat)
        else:
            s_tilde = s
        if here("scores_passed_on", l + 1):
            Xs.append(s)
        elif here("no_relu", l + 1):
            Xs.append(s_tilde)
        else:
            Xs.append(np.maximum(0, s_tilde))
    s = W[-1] @ Xs[-1] + b[-1]
    P = np.exp(s) / np.sum(np.exp(s), axis=0)
    if here("softmax_twice", k):
        P = np.exp(P) / np.sum(np.exp(P), axis=0)

    grad_W, grad_b, grad_gamma, grad_beta = [None] * k, [None] * k, [], []
    G = -(Y - P)
    if here("double_1_over_n", k):
        G = G / n
    for l in range(k - 1, -1, -1):
        if l < k - 1 and gamma:
            G = _student_bn_back(G, l, Ss, Shats, mus, vs, gamma, eps, n, here, grad_gamma,
                                 grad_beta)
        c = 1 if here("no_1_over_n", l + 1) else 1 / n
        gW = c * G @ Xs[l].T
        if here("grad_W_transposed", l + 1):
            gW = gW.T
        if here("l2_lambda", l + 1):
            gW = gW + lam * W[l]
        elif here("l2_from_gradient", l + 1):
            gW = gW + 2 * lam * gW
        else:
            gW = gW + 2 * lam * W[l]
        grad_W[l], grad_b[l] = gW, c * np.sum(G, axis=1, keepdims=True)
        if l > 0:
            G = W[l] @ G if here("W_not_transposed", l + 1) else W[l].T @ G
            G = G * ((Ss[l - 1] if here("relu_mask_on_scores", l) else Xs[l]) > 0)
    return grad_W, grad_b, grad_gamma[::-1], grad_beta[::-1]


def _student_bn_back(G, l, Ss, Shats, mus, vs, gamma, eps, n, here, grad_gamma, grad_beta):
    c = 1 if here("gamma_beta_no_1_over_n", l + 1) else 1 / n
    gg, gb = c * np.sum(G * Shats[l], axis=1, keepdims=True), c * np.sum(G, axis=1,
                                                                          keepdims=True)
    if here("gamma_beta_scalar", l + 1):
        gg, gb = np.sum(gg) * np.ones_like(gg), np.sum(gb) * np.ones_like(gb)
    grad_gamma.append(gg)
    grad_beta.append(gb)
    G = G * gamma[l]
    if here("no_bn_backward", l + 1):
        return G
    v = vs[l]
    s1, s2 = (v + eps) ** -0.5, (v + eps) ** -1.5
    if here("sigma_first_unit_both", l + 1):
        s1, s2 = np.diag(v + eps) ** -0.5, np.diag(v + eps) ** -1.5
    G1 = G * s1
    G2 = G * (s1 if here("sigma1_for_sigma2", l + 1) else s2)
    D = Ss[l] - mus[l]
    c_ = G2 * D if here("c_not_summed", l + 1) else np.sum(G2 * D, axis=1, keepdims=True)
    out = G1
    if not here("bn_no_mean_term", l + 1):
        out = out - np.sum(G1, axis=1, keepdims=True) / n
    if not here("bn_no_var_term", l + 1):
        out = out - D * c_ / n
    return out


def student(eps: float, *mistakes: tuple[str, int]):
    return lambda X, Y, W, b, gamma, beta, lam: student_gradients(
        X, Y, W, b, gamma, beta, lam, eps, mistakes)


def case_for(k: int, batch_norm: bool = True, eps: float = 1e-12, seed: int = 0):
    # d = the hidden width: W1 and the hidden W_l are square (transpositions can occur)
    return make_case(d=8, n=20, hidden=(8,) * (k - 1), batch_norm=batch_norm, lam=0.05,
                     eps=eps, seed=seed)


@pytest.mark.parametrize("batch_norm", [True, False])
@pytest.mark.parametrize("k", [2, 3, 5, 9])
def test_the_course_reference_is_klayers_network(k: int, batch_norm: bool) -> None:
    case = make_case(d=6, n=12, hidden=(7, 5, 6, 5, 7, 6, 5, 6)[: k - 1], batch_norm=batch_norm,
                     lam=0.03, eps=1e-5, seed=k)
    grads = backward(case, forward(case))
    net = Network(NetConfig(d=6, hidden=(7, 5, 6, 5, 7, 6, 5, 6)[: k - 1], dtype="float64",
                            batch_norm=batch_norm, bn_eps=1e-5))
    for l in range(1, k + 1):
        net.params[f"W{l}"][...] = case.W[l - 1].T  # klayer's rows: W_course = W.T
        net.params[f"b{l}"][...] = case.b[l - 1][:, 0]
        if batch_norm and l < k:
            net.params[f"gamma{l}"][...] = case.gamma[l - 1][:, 0]
            net.params[f"beta{l}"][...] = case.beta[l - 1][:, 0]
    _, _, ref = net.loss_and_grads(case.X.T, case.Y.argmax(axis=0), case.lam)
    for name, g in grads.items():
        r = ref[name].T if name.startswith("W") else ref[name][:, None]
        np.testing.assert_allclose(g, r, rtol=1e-9, atol=1e-12, err_msg=name)


@pytest.mark.parametrize("rows", [False, True])
@pytest.mark.parametrize("batch_norm", [True, False])
@pytest.mark.parametrize("k", range(2, 10))
def test_a_correct_implementation_passes(k: int, batch_norm: bool, rows: bool) -> None:
    case = case_for(k, batch_norm)
    W, b, g, be = student_gradients(case.X, case.Y, case.W, case.b, case.gamma, case.beta,
                                    case.lam, case.eps)
    mine = {f"grad_{n}{l}": (a.T if rows else a) for n, arrays in
            (("W", W), ("b", b), ("gamma", g), ("beta", be)) for l, a in enumerate(arrays, 1)}
    report = compare(case, mine)
    assert report.ok, report.text()
    assert report.layout == ("rows" if rows else "columns")
    assert max(report.params.values()) <= TOL and not report.diagnosis


def _applicable(k: int) -> list[tuple[str, int]]:
    case = case_for(k)
    return [(m.name, l) for m in BUG_MODELS for l in layers_of(m, case)
            if m.name != "eps_outside_sqrt" or l]


@pytest.mark.parametrize("k", [2, 3, 4, 5])
def test_every_bug_model_is_named_by_reproduction(k: int) -> None:
    missed = []
    for name, at in _applicable(k):
        eps = 1e-2 if name == "eps_outside_sqrt" else 1e-12  # invisible at 1e-12
        case = case_for(k, eps=eps)
        report = check_function(student(eps, (name, at)), case)
        words = MODELS[name].words
        where = "" if MODELS[name].where == "top" else (
            " in every layer" if at == 0 else f" in layer {at}")
        if report.ok or not any(words + where in d for d in report.diagnosis):
            missed.append(f"{name}@{at}: {report.diagnosis or report.pattern}")
    assert not missed, "\n".join(missed)


def test_two_mistakes_are_named_together() -> None:
    case = case_for(4)
    report = check_function(student(case.eps, ("l2_lambda", 4), ("bn_no_var_term", 2)), case)
    assert not report.ok
    assert any("lacks its variance term D . c in layer 2" in d and "lambda W instead of 2 "
               "lambda W in layer 4" in d for d in report.diagnosis), report.text()


@pytest.mark.parametrize("student_eps", [1e-5, 1e-6, 1e-7])
def test_another_epsilon_is_a_convention_not_a_bug(student_eps: float) -> None:
    case = case_for(3)
    tiny = check_function(student(1e-9), case)  # this case's variances dwarf 1e-9
    assert tiny.ok and tiny.eps_found is None and max(tiny.params.values()) <= TOL
    report = check_function(student(student_eps), case)
    assert report.ok and report.eps_found == student_eps
    assert f"correct for eps = {student_eps:g}; the case uses 1e-12" in report.text()
    assert compare(case, _named(student(student_eps), case), eps=student_eps).eps_found is None


def _named(fn, case):
    W, b, g, be = fn(case.X, case.Y, case.W, case.b, case.gamma, case.beta, case.lam)
    return {f"grad_{n}{l}": a for n, arrays in (("W", W), ("b", b), ("gamma", g),
                                                 ("beta", be)) for l, a in enumerate(arrays, 1)}


def test_the_first_wrong_forward_value_is_named_and_cost_bugs_too() -> None:
    case = case_for(3)
    f = forward(case)
    mine = {**_named(student(case.eps), case), "S1": f.S[0], "mu1": f.mu[0],
            "v1": f.v[0] * 20 / 19, "S_hat1": f.S_hat[0]}
    report = compare(case, mine)
    assert not report.ok and report.first_wrong_forward == "v1"
    for model in COST_MODELS:
        from klayer.check.bugs import switch

        J = forward(case, on=switch(((model.name, case.k),), case)).J
        report = compare(case, {**_named(student(case.eps), case), "J": np.array(J)})
        assert not report.ok and report.first_wrong_forward == "J"
        assert any(model.words in d for d in report.diagnosis), report.text()


def test_no_model_gives_the_pattern_from_the_top() -> None:
    case = case_for(3)
    mine = _named(student(case.eps), case)
    mine["grad_W2"] = mine["grad_W2"] + 0.3 * np.random.default_rng(1).standard_normal((8, 8))
    report = compare(case, mine)
    assert not report.ok and not report.diagnosis
    assert "Wrong: W2" in report.pattern and "is layer 2" in report.pattern


def test_a_step_with_the_wrong_gradient_is_caught() -> None:
    case = case_for(3)
    grads = backward(case, forward(case))
    before = {f"{g}{l}": a for g in ("W", "b", "gamma", "beta")
              for l, a in enumerate(getattr(case, g), 1)}
    after = {n: p - 0.1 * grads[n] for n, p in before.items()}
    after["gamma1"] = before["gamma1"] - 0.1 * grads["beta1"]
    after["W2"] = before["W2"] + 0.1 * grads["W2"]
    lines = dict(line.split(": ", 1) for line in check_step(case, before, after, 0.1))
    assert lines["W1"].startswith("ok")
    assert lines["gamma1"].startswith("WRONG: updated with beta1's gradient")
    assert lines["W2"].startswith("WRONG: updated in the wrong direction")


@pytest.mark.parametrize("suffix", [".npz", ".mat"])
def test_cases_round_trip_and_mat_cells_are_read(tmp_path, suffix: str) -> None:
    pytest.importorskip("scipy")
    case = case_for(3)
    save_case(case, tmp_path / f"case{suffix}")
    back = load_case(tmp_path / f"case{suffix}")
    assert back.k == 3 and back.eps == case.eps and back.lam == case.lam
    for a, b in zip(back.W + back.gamma, case.W + case.gamma, strict=True):
        np.testing.assert_array_equal(a, b)
    if suffix == ".mat":
        from scipy.io import loadmat, savemat

        assert loadmat(tmp_path / "case.mat")["W"].shape == (1, 3)  # W{l} in MATLAB
        W, b, g, be = student(case.eps, ("l2_lambda", 0))(case.X, case.Y, case.W, case.b,
                                                         case.gamma, case.beta, case.lam)
        cells = {}
        for name, arrays in (("grad_W", W), ("grad_b", b), ("grad_gamma", g), ("grad_beta", be)):
            cell = np.empty((1, len(arrays)), dtype=object)
            cell[0, :] = arrays
            cells[name] = cell
        savemat(tmp_path / "mine.mat", cells)
        from klayer.check import load_arrays

        report = compare(back, load_arrays(tmp_path / "mine.mat"))
        assert any("lambda W instead of 2 lambda W in every layer" in d
                   for d in report.diagnosis), report.text()


def test_a_matlab_struct_of_cell_arrays_is_read(tmp_path) -> None:
    from scipy.io import savemat

    from klayer.check import load_arrays

    case = case_for(3)
    W, b, g, be = student(case.eps, ("c_not_summed", 2))(case.X, case.Y, case.W, case.b,
                                                         case.gamma, case.beta, case.lam)

    def cell(arrays):
        out = np.empty((1, len(arrays)), dtype=object)
        out[0, :] = arrays
        return out

    grads = {"grad_W": cell(W), "grad_b": cell(b), "grad_gamma": cell(g), "grad_beta": cell(be)}
    savemat(tmp_path / "mine.mat", {"grads": grads})  # MATLAB: grads.grad_W{l}, ...
    report = compare(case, load_arrays(tmp_path / "mine.mat"))
    assert any("c is not summed over the batch in layer 2" in d for d in report.diagnosis)


def test_parameters_saved_beside_the_gradients_are_not_taken_for_them() -> None:
    case = case_for(3)
    mine = {**_named(student(case.eps), case),
            **{f"W{l}": W for l, W in enumerate(case.W, 1)}}  # the student's W too
    report = compare(case, mine)
    assert report.ok, report.text()
    assert any("W1 taken for a parameter" in n for n in report.notes)


def test_compressed_npz_files_are_read(tmp_path) -> None:
    from klayer.check import load_arrays

    case = case_for(3)
    np.savez_compressed(tmp_path / "mine.npz", **_named(student(case.eps), case))
    assert compare(case, load_arrays(tmp_path / "mine.npz")).ok  # np.savez_compressed too
