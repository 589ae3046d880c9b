"""
Muon + AdamW for MLX: upstream karpathy/autoresearch's MuonAdamW, same maths as muon_torch.py.

Parameter groups are the same plain dicts as in PyTorch, except that "params" holds parameter
PATHS, the dotted names of mlx.utils.tree_flatten(model.trainable_parameters()), e.g.
"transformer.wte.weight", "transformer.h.0.attn.c_q.weight", "value_embeds.1.weight":

    dict(kind="adamw", params=[paths], lr=..., betas=(b1, b2), eps=1e-10, weight_decay=0.0)
    dict(kind="muon", params=[paths of one 2-D shape], lr=..., momentum=0.95, ns_steps=5,
         beta2=0.95, weight_decay=...)

All maths runs in fp32 (Newton-Schulz too); params of another dtype (bf16 on Metal) are cast
back after the step. Optimizer state is fp32.

How the scheduled hyperparameters reach the maths
-------------------------------------------------
The trainer changes group["lr"] (and for muon groups "momentum", "weight_decay") every step.
Those are Python floats, and a Python float read inside mx.compile is frozen into the graph
at trace time. So opt.state holds every hyperparameter as an mx.array scalar next to the
moment buffers and step counts, and the maths only ever reads the arrays.
opt.sync_hyperparameters() copies the group dicts into those arrays; it must run OUTSIDE
any compiled function.

Eager: nothing to do, update() syncs by itself whenever a group value has changed.

    opt = MuonAdamW(groups, model)
    loss, grads = loss_and_grad(model, x, y)
    opt.update(model, grads)

Compiled (the mlx-examples pattern): call opt.sync_hyperparameters() before EVERY call.

    state = [model.state, opt.state]
    step_fn = mx.compile(train_step, inputs=state, outputs=state)   # train_step calls opt.update
    for ...:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * lrm
        opt.sync_hyperparameters()
        loss = step_fn(x, y)
        mx.eval(loss, state)

Inside the traced update() the values are then already in sync, so nothing is written and the
graph reads lr from opt.state. ns_steps is structural (it sets the number of matmuls) and is
read at trace time; changing it needs a new mx.compile.
"""

import mlx.core as mx
from mlx.utils import tree_flatten, tree_map_with_path

# Polar Express coefficients (a, b, c) for the odd polynomial X <- aX + bX^3 + cX^5, one per step
POLAR_EXPRESS_COEFFS = [
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
]

ADAMW_KEYS = ("lr", "betas", "eps", "weight_decay")
MUON_KEYS = ("lr", "momentum", "ns_steps", "beta2", "weight_decay")

# -----------------------------------------------------------------------------
# The maths, on fp32 arrays. Pure functions: they return new arrays.

def polar_express(G, ns_steps=5):
    """Approximately orthogonalise each matrix of G (..., M, N): push its singular values towards 1."""
    X = G.astype(mx.float32)
    # 1.02 keeps the largest singular value safely below 1 even if the norm is a bit off
    X = X / (mx.sqrt(mx.sum(X * X, axis=(-2, -1), keepdims=True)) * 1.02 + 1e-6)
    tall = X.shape[-2] > X.shape[-1]
    for a, b, c in POLAR_EXPRESS_COEFFS[:ns_steps]:
        # work with the smaller Gram matrix: N x N for tall matrices, M x M otherwise
        if tall:
            A = mx.swapaxes(X, -1, -2) @ X
            X = a * X + X @ (b * A + c * (A @ A))
        else:
            A = X @ mx.swapaxes(X, -1, -2)
            X = a * X + (b * A + c * (A @ A)) @ X
    return X


def adamw_step(p, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, wd):
    """One AdamW step. Returns (p, exp_avg, exp_avg_sq)."""
    p = p * (1 - lr * wd)
    exp_avg = exp_avg + (1 - beta1) * (grad - exp_avg)
    exp_avg_sq = exp_avg_sq + (1 - beta2) * (grad * grad - exp_avg_sq)
    bias1 = 1 - beta1 ** step
    bias2 = 1 - beta2 ** step
    denom = mx.sqrt(exp_avg_sq / bias2) + eps
    p = p - (lr / bias1) * exp_avg / denom
    return p, exp_avg, exp_avg_sq


def muon_step(grads, params, momentum_buffer, second_momentum_buffer,
              momentum, lr, wd, beta2, ns_steps):
    """One Muon step on a stack of same-shape matrices (k, M, N); lr is already scaled by
    max(1, M/N)^0.5. Returns (params, momentum_buffer, second_momentum_buffer)."""
    # Nesterov momentum
    momentum_buffer = momentum_buffer + (1 - momentum) * (grads - momentum_buffer)
    g = grads + momentum * (momentum_buffer - grads)
    # orthogonalise
    g = polar_express(g, ns_steps)
    # NorMuon: per-row (or per-column) second moment, then rescale so the total norm is kept
    red_dim = -1 if g.shape[-2] >= g.shape[-1] else -2
    n = g.shape[red_dim]
    v_mean = mx.mean(g * g, axis=red_dim, keepdims=True)
    v_norm = mx.sqrt(mx.sum(v_mean, axis=(-2, -1), keepdims=True) * n)
    second_momentum_buffer = second_momentum_buffer + (1 - beta2) * (v_mean - second_momentum_buffer)
    step_size = mx.rsqrt(mx.maximum(second_momentum_buffer, 1e-10))
    v_norm_new = mx.sqrt(mx.sum(v_mean * n * step_size * step_size, axis=(-2, -1), keepdims=True))
    g = g * step_size * (v_norm / mx.maximum(v_norm_new, 1e-10))
    # cautious weight decay: only decay entries the update already pushes towards zero
    mask = (g * params) >= 0
    params = params - (lr * g + lr * wd * params * mask)
    return params, momentum_buffer, second_momentum_buffer

# -----------------------------------------------------------------------------
# The optimizer

class MuonAdamW:
    """Muon for the 2-D block matrices, AdamW for everything else (embeddings, lm_head, scalars).
    The model is needed up front to size the state, so opt.state is complete before mx.compile."""

    def __init__(self, param_groups, model):
        self.param_groups = list(param_groups)
        shapes = {path: p.shape for path, p in tree_flatten(model.trainable_parameters())}
        seen = set()
        for i, group in enumerate(self.param_groups):
            check_group(i, group, shapes, seen)
        self._state = {"groups": [init_group_state(g, shapes) for g in self.param_groups]}
        self._synced = None
        self.sync_hyperparameters()

    @property
    def state(self):
        """All optimizer state as a pytree of mx.arrays: moments, step counts and the current
        hyperparameters. Always the same dict object, so it can be given to mx.compile."""
        return self._state

    def _hyperparameters(self):
        """The group values the maths reads, as Python floats, one dict per group."""
        out = []
        for group in self.param_groups:
            hp = {"lr": group["lr"], "weight_decay": group["weight_decay"]}
            if group["kind"] == "adamw":
                hp.update(beta1=group["betas"][0], beta2=group["betas"][1], eps=group["eps"])
            else:
                beta2 = group["beta2"] if group["beta2"] is not None else 0.0
                hp.update(momentum=group["momentum"], beta2=beta2)
            out.append({k: float(v) for k, v in hp.items()})
        return out

    def sync_hyperparameters(self):
        """Copy group["lr"] etc. into opt.state. Never call this inside mx.compile."""
        hps = self._hyperparameters()
        for hp, st in zip(hps, self._state["groups"]):
            for k, v in hp.items():
                st[k] = mx.array(v, dtype=mx.float32)
        self._synced = hps

    def update(self, model, grads):
        """Apply one step. grads is the tree from nn.value_and_grad(model, ...)."""
        # eager use: pick up new schedule values. Under mx.compile the trainer has synced already,
        # so this is a no-op while tracing and the graph keeps reading the state arrays.
        if self._hyperparameters() != self._synced:
            self.sync_hyperparameters()
        flat_grads = dict(tree_flatten(grads))
        flat_params = dict(tree_flatten(model.trainable_parameters()))
        new_params = {}
        for group, st in zip(self.param_groups, self._state["groups"]):
            if group["kind"] == "adamw":
                self._update_adamw(group, st, flat_params, flat_grads, new_params)
            else:
                self._update_muon(group, st, flat_params, flat_grads, new_params)
        # rebuild the tree from the model's own structure: tree_unflatten would turn
        # value_embeds {"1": ...} (a dict keyed by layer index) into a list
        model.update(tree_map_with_path(lambda path, p: new_params.get(path, p),
                                        model.trainable_parameters()))

    def _update_adamw(self, group, st, flat_params, flat_grads, new_params):
        st["step"] = st["step"] + 1
        step = st["step"].astype(mx.float32)
        for i, path in enumerate(group["params"]):
            p = flat_params[path]
            grad = get_grad(flat_grads, path).astype(mx.float32)
            new_p, st["exp_avg"][i], st["exp_avg_sq"][i] = adamw_step(
                p.astype(mx.float32), grad, st["exp_avg"][i], st["exp_avg_sq"][i], step,
                st["lr"], st["beta1"], st["beta2"], st["eps"], st["weight_decay"])
            new_params[path] = new_p.astype(p.dtype)

    def _update_muon(self, group, st, flat_params, flat_grads, new_params):
        paths = group["params"]
        if not paths:
            return
        params = [flat_params[path] for path in paths]
        M, N = params[0].shape
        grads = mx.stack([get_grad(flat_grads, path) for path in paths]).astype(mx.float32)
        stacked = mx.stack(params).astype(mx.float32)
        lr = st["lr"] * max(1.0, M / N) ** 0.5
        stacked, st["momentum_buffer"], st["second_momentum_buffer"] = muon_step(
            grads, stacked, st["momentum_buffer"], st["second_momentum_buffer"],
            st["momentum"], lr, st["weight_decay"], st["beta2"], group["ns_steps"])
        for i, (path, p) in enumerate(zip(paths, params)):
            new_params[path] = stacked[i].astype(p.dtype)

# -----------------------------------------------------------------------------
# Helpers

def get_grad(flat_grads, path):
    if path not in flat_grads:
        raise ValueError(f"no gradient for {path!r}: pass the full grads tree from nn.value_and_grad(model, ...)")
    return flat_grads[path]


def init_group_state(group, shapes):
    """Zeroed fp32 buffers for one group; the hyperparameters are filled in by sync_hyperparameters()."""
    paths = group["params"]
    if group["kind"] == "adamw":
        zeros = lambda: [mx.zeros(shapes[path], dtype=mx.float32) for path in paths]
        return {"step": mx.array(0, dtype=mx.int32), "exp_avg": zeros(), "exp_avg_sq": zeros()}
    if not paths:
        return {}
    k, (M, N) = len(paths), shapes[paths[0]]
    buf2_shape = (k, M, 1) if M >= N else (k, 1, N)
    return {"momentum_buffer": mx.zeros((k, M, N), dtype=mx.float32),
            "second_momentum_buffer": mx.zeros(buf2_shape, dtype=mx.float32)}


def check_group(i, group, shapes, seen):
    """Raise a one-line ValueError if a param group is not a valid adamw/muon group of this model."""
    kind = group.get("kind")
    if kind not in ("adamw", "muon"):
        raise ValueError(f"param group {i}: kind must be 'adamw' or 'muon', got {kind!r}")
    keys = ADAMW_KEYS if kind == "adamw" else MUON_KEYS
    missing = [key for key in keys if key not in group]
    if missing:
        raise ValueError(f"param group {i} ({kind}): missing {', '.join(missing)}")
    for path in group["params"]:
        if not isinstance(path, str) or path not in shapes:
            raise ValueError(f"param group {i} ({kind}): {path!r} is not a trainable parameter path of the model; "
                             f"list them with mlx.utils.tree_flatten(model.trainable_parameters())")
        if path in seen:
            raise ValueError(f"param group {i} ({kind}): {path!r} appears in more than one group")
        seen.add(path)
    if kind == "muon":
        group_shapes = {tuple(shapes[path]) for path in group["params"]}
        if len(group_shapes) > 1 or any(len(s) != 2 for s in group_shapes):
            raise ValueError(f"param group {i} (muon): needs 2-D params of one shape, got shapes "
                             f"{sorted(group_shapes)}; make one muon group per matrix shape")
