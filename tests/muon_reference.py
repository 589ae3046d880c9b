"""
A float64 NumPy version of upstream's MuonAdamW, the ground truth for backends/muon_torch.py, backends/muon_mlx.py
(tests/test_muon.py) and the trainers' own parameter groups (tests/test_trainers.py).

Written from the algorithm description in a deliberately different form (per-matrix loops, X X^T polynomial for
every shape, NorMuon as "rescale to the old Frobenius norm"), so a shared slip cannot hide.
"""

import numpy as np

PE_COEFFS = [
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
]


def ref_orthogonalize(G, ns_steps):
    X = G / (np.sqrt((G * G).sum()) * 1.02 + 1e-6)
    for a, b, c in PE_COEFFS[:ns_steps]:
        S = X @ X.T  # a X + b (X X^T) X + c (X X^T)^2 X is the same polynomial for any shape
        X = a * X + b * S @ X + c * S @ S @ X
    return X


def ref_adamw(p, g, st, hp):
    st["t"] += 1
    b1, b2 = hp["betas"]
    st["m"] = b1 * st["m"] + (1 - b1) * g
    st["v"] = b2 * st["v"] + (1 - b2) * g * g
    m_hat = st["m"] / (1 - b1 ** st["t"])
    v_hat = st["v"] / (1 - b2 ** st["t"])
    return p * (1 - hp["lr"] * hp["weight_decay"]) - hp["lr"] * m_hat / (np.sqrt(v_hat) + hp["eps"])


def ref_muon(p, g, st, j, hp):
    """Matrix j of a muon group; st holds the group's buffers per matrix."""
    M, N = p.shape
    mu = hp["momentum"]
    st["buf"][j] = mu * st["buf"][j] + (1 - mu) * g
    u = ref_orthogonalize((1 - mu) * g + mu * st["buf"][j], hp["ns_steps"])
    # NorMuon: EMA of the mean square per row (M >= N) or per column, divide by its sqrt,
    # then scale back to the Frobenius norm u had before
    row_ms = (u * u).mean(axis=1, keepdims=True) if M >= N else (u * u).mean(axis=0, keepdims=True)
    st["buf2"][j] = hp["beta2"] * st["buf2"][j] + (1 - hp["beta2"]) * row_ms
    scaled = u / np.sqrt(np.maximum(st["buf2"][j], 1e-10))
    u = scaled * np.linalg.norm(u) / max(np.linalg.norm(scaled), 1e-10)
    lr = hp["lr"] * np.sqrt(max(1.0, M / N))
    decay = np.where(u * p >= 0, hp["weight_decay"] * p, 0.0)
    return p - lr * u - lr * decay



def ref_step(params, grads, groups, states):
    """One float64 step, in place on params (path -> array) from grads (path -> array). groups: upstream-style dicts
    whose "params" are paths; states: a dict kept from one step to the next."""
    for i, group in enumerate(groups):
        for j, path in enumerate(group["params"]):
            g = grads[path].astype(np.float64)
            if group["kind"] == "adamw":
                st = states.setdefault(path, {"t": 0, "m": 0.0, "v": 0.0})
                params[path] = ref_adamw(params[path], g, st, group)
            else:
                st = states.setdefault(i, {"buf": {}, "buf2": {}})
                st["buf"].setdefault(j, 0.0)
                st["buf2"].setdefault(j, 0.0)
                params[path] = ref_muon(params[path], g, st, j, group)
