"""
Muon + AdamW for PyTorch (CUDA, MPS, CPU): upstream karpathy/autoresearch's MuonAdamW.

Parameter groups are plain dicts with kind="adamw" or kind="muon":

    dict(kind="adamw", params=[...], lr=..., betas=(b1, b2), eps=1e-10, weight_decay=0.0)
    dict(kind="muon", params=[...all the same 2-D shape...], lr=..., momentum=0.95,
         ns_steps=5, beta2=0.95, weight_decay=...)

The trainer may change group["lr"], ["momentum"], ["weight_decay"] (and ["betas"]) before
every step(); the new values are read on every step, nothing is cached.

How it runs, chosen from the device of the parameters (compile= forces it either way):
- CUDA: both step functions go through torch.compile(dynamic=False, fullgraph=True) and the
  scheduled scalars are passed as 0-D CPU tensors, so a new lr never triggers a recompile.
  Newton-Schulz runs in bf16, as upstream does.
- MPS and CPU: eager, everything in fp32 (Newton-Schulz too). Optimizer state is always fp32
  and grads/params are cast to fp32 before the maths, so lerp_ never sees mixed dtypes
  (a known MPS pitfall); bf16 params get the fp32 result copied back.
The Newton-Schulz dtype follows the device (bf16 on CUDA only), not compile=, so
compile=True on CPU runs the compiled code path with fp32 maths.
"""

import torch

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
# The maths. Scalars are Python floats (eager) or 0-D CPU tensors (compiled); tensors are fp32.

def polar_express(G, ns_steps=5, dtype=torch.float32):
    """Approximately orthogonalise each matrix of G (..., M, N): push its singular values towards 1."""
    X = G.to(dtype)
    # 1.02 keeps the largest singular value safely below 1 even if the norm is a bit off
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * 1.02 + 1e-6)
    tall = X.size(-2) > X.size(-1)
    for a, b, c in POLAR_EXPRESS_COEFFS[:ns_steps]:
        # work with the smaller Gram matrix: N x N for tall matrices, M x M otherwise
        if tall:
            A = X.mT @ X
            X = a * X + X @ (b * A + c * (A @ A))
        else:
            A = X @ X.mT
            X = a * X + (b * A + c * (A @ A)) @ X
    return X


def adamw_step(p, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, wd):
    """One AdamW step, in place on p, exp_avg, exp_avg_sq."""
    p.mul_(1 - lr * wd)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.lerp_(grad.square(), 1 - beta2)
    bias1 = 1 - beta1 ** step
    bias2 = 1 - beta2 ** step
    denom = (exp_avg_sq / bias2).sqrt() + eps
    p.sub_(exp_avg / denom * (lr / bias1))


def muon_step(grads, params, momentum_buffer, second_momentum_buffer,
              momentum, lr, wd, beta2, ns_steps, ns_dtype):
    """One Muon step on a stack of same-shape matrices (k, M, N), in place on params and buffers.
    grads is used as scratch space. lr is already scaled by max(1, M/N)^0.5."""
    # Nesterov momentum
    momentum_buffer.lerp_(grads, 1 - momentum)
    g = grads.lerp_(momentum_buffer, momentum)
    # orthogonalise
    g = polar_express(g, ns_steps, ns_dtype).float()
    # NorMuon: per-row (or per-column) second moment, then rescale so the total norm is kept
    red_dim = -1 if g.size(-2) >= g.size(-1) else -2
    n = g.size(red_dim)
    v_mean = g.square().mean(dim=red_dim, keepdim=True)
    v_norm = (v_mean.sum(dim=(-2, -1), keepdim=True) * n).sqrt()
    second_momentum_buffer.lerp_(v_mean, 1 - beta2)
    step_size = second_momentum_buffer.clamp_min(1e-10).rsqrt()
    v_norm_new = (v_mean * n * step_size.square()).sum(dim=(-2, -1), keepdim=True).sqrt()
    g = g * step_size * (v_norm / v_norm_new.clamp_min(1e-10))
    # cautious weight decay: only decay entries the update already pushes towards zero
    mask = (g * params) >= 0
    params.sub_(lr * g + lr * wd * params * mask)

# -----------------------------------------------------------------------------
# The optimizer

class MuonAdamW(torch.optim.Optimizer):
    """Muon for the 2-D block matrices, AdamW for everything else (embeddings, lm_head, scalars)."""

    def __init__(self, param_groups, *, compile=None):
        super().__init__(param_groups, defaults={})
        for i, group in enumerate(self.param_groups):
            check_group(i, group)
        params = [p for group in self.param_groups for p in group["params"]]
        device_type = params[0].device.type if params else "cpu"
        self.compiled = (device_type == "cuda") if compile is None else bool(compile)
        self.ns_dtype = torch.bfloat16 if device_type == "cuda" else torch.float32
        if self.compiled:
            self._adamw_fn = torch.compile(adamw_step, dynamic=False, fullgraph=True)
            self._muon_fn = torch.compile(muon_step, dynamic=False, fullgraph=True)
            # refilled before every call: the compiled graphs read them as inputs, not constants
            self._scalar_tensors = {}
        else:
            self._adamw_fn = adamw_step
            self._muon_fn = muon_step

    def _scalars(self, kind, **values):
        """Python floats for eager mode, 0-D CPU tensors (refilled in place) for compiled mode."""
        if not self.compiled:
            return {k: float(v) for k, v in values.items()}
        tensors = self._scalar_tensors.setdefault(kind, {})
        for k, v in values.items():
            if k not in tensors:
                tensors[k] = torch.tensor(0.0, dtype=torch.float32, device="cpu")
            tensors[k].fill_(v)
        return tensors

    def _step_adamw(self, group):
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
            state["step"] += 1
            p32 = p if p.dtype == torch.float32 else p.float()
            beta1, beta2 = group["betas"]
            scalars = self._scalars("adamw", step=state["step"], lr=group["lr"], beta1=beta1,
                                    beta2=beta2, eps=group["eps"], wd=group["weight_decay"])
            self._adamw_fn(p32, p.grad.float(), state["exp_avg"], state["exp_avg_sq"], **scalars)
            if p32 is not p:
                p.copy_(p32)

    def _step_muon(self, group):
        params = group["params"]
        if not params or all(p.grad is None for p in params):
            return
        # the group's buffers are stacked (k, M, N) and live in the state of its first param
        state = self.state[params[0]]
        k, (M, N) = len(params), params[0].shape
        if not state:
            device = params[0].device
            state["momentum_buffer"] = torch.zeros(k, M, N, dtype=torch.float32, device=device)
            buf2_shape = (k, M, 1) if M >= N else (k, 1, N)
            state["second_momentum_buffer"] = torch.zeros(buf2_shape, dtype=torch.float32, device=device)
        # a param without a grad (unused this step) contributes a zero gradient
        grads = torch.stack([torch.zeros_like(p) if p.grad is None else p.grad for p in params]).float()
        stacked = torch.stack(params).float()
        beta2 = group["beta2"] if group["beta2"] is not None else 0.0
        scalars = self._scalars("muon", momentum=group["momentum"],
                                lr=group["lr"] * max(1.0, M / N) ** 0.5,
                                wd=group["weight_decay"], beta2=beta2)
        self._muon_fn(grads, stacked, state["momentum_buffer"], state["second_momentum_buffer"],
                      **scalars, ns_steps=group["ns_steps"], ns_dtype=self.ns_dtype)
        for p, new in zip(params, stacked.unbind(0)):
            p.copy_(new)

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            if group["kind"] == "adamw":
                self._step_adamw(group)
            else:
                self._step_muon(group)


def check_group(i, group):
    """Raise a one-line ValueError if a param group is not a valid adamw/muon group."""
    kind = group.get("kind")
    if kind not in ("adamw", "muon"):
        raise ValueError(f"param group {i}: kind must be 'adamw' or 'muon', got {kind!r}")
    keys = ADAMW_KEYS if kind == "adamw" else MUON_KEYS
    missing = [key for key in keys if key not in group]
    if missing:
        raise ValueError(f"param group {i} ({kind}): missing {', '.join(missing)}")
    if kind == "muon":
        shapes = {tuple(p.shape) for p in group["params"]}
        if len(shapes) > 1 or any(len(s) != 2 for s in shapes):
            raise ValueError(f"param group {i} (muon): needs 2-D params of one shape, got shapes "
                             f"{sorted(shapes)}; make one muon group per matrix shape")
