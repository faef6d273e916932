"""What a recipe trains with: its optimizer, its learning-rate schedule and its loss (the values come checked)."""

import logging
import math

import torch
import torch.nn.functional as F

from s5.config import check_one_cycle
from s5.device import native_bf16

log = logging.getLogger(__name__)
LOSSES = {"nll_loss": F.nll_loss, "cross_entropy": F.cross_entropy}


class Muon(torch.optim.Optimizer):
    """Muon (Keller Jordan, 2024) for the hidden layers' weights, AdamW for the rest, in one optimizer (so checkpoints,
    the one-cycle's lr and beta1, and DDP take it as any other). A hidden weight's update is its gradient's Nesterov
    momentum as a matrix (out × in·k·k), orthogonalised by five Newton-Schulz steps (in bf16 where the device has it
    natively, else in fp32: emulated bf16 took 30 times fp32's time) and scaled by 0.2·√max(out, in·k·k) to AdamW's
    update size (Liu et al., 2025), so one learning rate serves both halves. Param groups with `muon=False` (the input
    and output layers, the biases) step as AdamW."""

    def __init__(self, groups, lr, betas, weight_decay, eps=1e-8, ns_steps=5):
        super().__init__(groups, dict(lr=lr, betas=betas, weight_decay=weight_decay, eps=eps, muon=False))
        params = [p for group in self.param_groups for p in group["params"]]
        if not params or any(p.is_complex() for p in params):
            raise ValueError("Muon got an empty parameter list" if not params else "Muon steps real parameters only: "
                             "use AdamW for a model with complex ones")
        self.ns_steps = ns_steps

    @staticmethod
    def orthogonalise(g, steps):
        """The Newton-Schulz quintic of Jordan et al. (its coefficients, its bf16): g's singular values towards 1."""
        x = g.to(torch.bfloat16 if native_bf16(g.device) else torch.float32)
        wide = x.size(0) <= x.size(1)
        x = x if wide else x.T
        x = x / x.norm().clamp(min=1e-7)
        for _ in range(steps):
            gram = x @ x.T
            x = 3.4445 * x + (-4.7750 * gram + 2.0315 * gram @ gram) @ x
        return (x if wide else x.T).to(g.dtype)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            (beta1, beta2), lr, decay = group["betas"], group["lr"], group["weight_decay"]
            for p in (p for p in group["params"] if p.grad is not None):
                grad, state = p.grad, self.state[p]
                p.mul_(1 - lr * decay)
                if group["muon"]:
                    if not state:
                        state["momentum_buffer"] = torch.zeros_like(p)
                    momentum = state["momentum_buffer"].lerp_(grad, 1 - beta1)
                    matrix = grad.lerp(momentum, beta1).flatten(1)  # Nesterov
                    scale = 0.2 * math.sqrt(max(matrix.shape))
                    p.add_(self.orthogonalise(matrix, self.ns_steps).view_as(p), alpha=-lr * scale)
                    continue
                if not state:
                    state.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
                state["step"] += 1
                t = state["step"].item()
                state["exp_avg"].lerp_(grad, 1 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                denom = (state["exp_avg_sq"] / (1 - beta2 ** t)).sqrt_().add_(group["eps"])
                p.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - beta1 ** t))
        return loss


def get_optimizer(model, recipe):
    """SGD with momentum (and Nesterov), Adam/AdamW with `momentum` as their first beta, or Muon: the weights of the
    hidden layers (every weight of two or more dimensions but the first and the last, in model.parameters()' order:
    a module's own, then its children's in the order __init__ assigned them) by Muon, the rest by AdamW."""
    params, lr, decay = model.parameters(), recipe.lr, recipe.weight_decay
    if recipe.optimizer == "Muon":
        params = list(params)
        hidden = [p for p in params if p.ndim >= 2][1:-1]
        groups = [dict(params=hidden, muon=True), dict(params=[p for p in params if not any(p is h for h in hidden)])]
        return Muon(groups, lr=lr, betas=(recipe.momentum, 0.999), weight_decay=decay)
    if recipe.optimizer == "SGD":
        return torch.optim.SGD(params, lr=lr, momentum=recipe.momentum, weight_decay=decay, nesterov=recipe.nesterov)
    adam = torch.optim.Adam if recipe.optimizer == "Adam" else torch.optim.AdamW
    return adam(params, lr=lr, betas=(recipe.momentum, 0.999), weight_decay=decay)


class LoggedStepLR(torch.optim.lr_scheduler.StepLR):
    """StepLR that logs when it changes the learning rate (torch dropped `verbose=`)."""

    def step(self):
        before = [group["lr"] for group in self.optimizer.param_groups]
        super().step()
        for i, (old, group) in enumerate(zip(before, self.optimizer.param_groups)):
            if group["lr"] != old:
                log.info(f"Adjusting learning rate of group {i} to {group['lr']:.4e}.")


def get_scheduler(optimizer, recipe, total_steps, verbose=False):
    """The recipe's StepLR (stepped once an epoch, logging its drops when `verbose`), or its OneCycleLR over
    `total_steps` batches peaking at the recipe's lr (stepped once a batch), the momentum (beta1) dipping from the
    recipe's by 0.1 as the learning rate rises (torch's default cycle ignored the recipe's momentum)."""
    if recipe.scheduler == "StepLR":
        cls = LoggedStepLR if verbose else torch.optim.lr_scheduler.StepLR
        return cls(optimizer, step_size=recipe.step_size, gamma=recipe.gamma)
    check_one_cycle(total_steps, recipe.pct_start)
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=recipe.lr, total_steps=total_steps,
                                               pct_start=recipe.pct_start, max_momentum=recipe.momentum,
                                               base_momentum=max(0.0, recipe.momentum - 0.1))


def steps_per_batch(scheduler):
    """Whether `scheduler` moves the learning rate after every batch (one-cycle) rather than every epoch."""
    return isinstance(scheduler, torch.optim.lr_scheduler.OneCycleLR)


def get_loss(name="nll_loss", label_smoothing=0.0):
    """The loss by name; with `label_smoothing` > 0, cross-entropy against smoothed targets, in fp32 (the Net's
    log-probabilities are their own log-softmax, so this is the smoothed NLL)."""
    if not label_smoothing:
        return LOSSES[name]

    def smoothed(log_probs, target):
        return F.cross_entropy(log_probs.float(), target, label_smoothing=label_smoothing)
    return smoothed


def build_training(model, recipe, steps_per_epoch, verbose=False):
    """Optimizer, scheduler and training loss for `recipe`, in one call."""
    optimizer = get_optimizer(model, recipe)
    scheduler = get_scheduler(optimizer, recipe, recipe.epochs * steps_per_epoch, verbose)
    return optimizer, scheduler, get_loss("nll_loss", recipe.label_smoothing)
